"""Loads: cached chunks into vLLM's paged cache, chunk by chunk, before the forward.

A load never holds the whole prefix on the device: chunks are fetched a few
at a time, the next few read while these are decoded and written
(`read_ahead.py`; encoded ones decoded together, on `codec_device`), and each one
goes through a staging slot (page-locked on CUDA) into the paged cache with
one indexed op per layer. Device memory used: the staging ring plus one
decode batch; on the CPU, chunks are decoded into the same few buffers every
round (`decode_buffers.py`).
"""

from __future__ import annotations

import torch

from lmc_connector.cache import CacheEngine
from lmc_connector.ops.paged import PagedKV
from lmc_connector.v1.decode_buffers import DecodeBuffers
from lmc_connector.v1.metadata import LoadSpec
from lmc_connector.v1.read_ahead import ReadAhead
from lmc_connector.v1.staging import Staging

#: Chunks fetched (and encoded ones decoded) per round.
FETCH_CHUNKS = 4


class ChunkLoader:
    """Owns the load path's staging ring and, decoding on the CPU, its decode buffers. Runs on
    vLLM's model-runner thread only."""

    def __init__(self, engine: CacheEngine, paged: PagedKV, codec_device: torch.device) -> None:
        self._engine = engine
        self._paged = paged
        self._codec_device = codec_device
        self._staging = Staging(paged, engine.layout.chunk_size)
        self._read_ahead = ReadAhead(engine.read)
        layout = engine.layout
        self._decode_into = (
            DecodeBuffers(layout.shape(layout.chunk_size), layout.torch_dtype, FETCH_CHUNKS)
            if codec_device.type == "cpu"
            else None  # torch's caching allocator already reuses device memory
        )

    def load(self, spec: LoadSpec, table: torch.Tensor) -> int:
        """Write tokens [spec.start, spec.end) of a request into its blocks (`table`, on the
        cache's device); returns the token up to which it succeeded (spec.end when all did).

        Whole-block formats also write the rest of the last block: those slots hold
        tokens this step's forward (re)writes, or none yet.
        """
        chunk_size = self._engine.layout.chunk_size
        stop = self._paged.aligned(spec.end)
        chunk_start = spec.first_chunk * chunk_size
        loaded = spec.start
        last = len(spec.keys) - 1
        rounds = [spec.keys[i : i + FETCH_CHUNKS] for i in range(0, len(spec.keys), FETCH_CHUNKS)]
        if not rounds:
            return loaded
        ahead = self._read_ahead
        ahead.start(rounds[0])
        try:
            for n, keys in enumerate(rounds):
                tensors = self._engine.tensors(keys, ahead.take(), self._codec_device,
                                               self._decode_into)  # fmt: skip
                if len(tensors) == len(keys) and n + 1 < len(rounds):
                    ahead.start(rounds[n + 1])
                for at, kv in enumerate(tensors, n * FETCH_CHUNKS):
                    if kv.shape[2] != chunk_size and at != last:
                        return loaded  # only a prompt's last chunk is short: else a miss
                    lo, hi = max(chunk_start, spec.start), min(chunk_start + kv.shape[2], stop)
                    if hi > lo:
                        self._write(kv[:, :, lo - chunk_start : hi - chunk_start], table, lo, hi)
                        loaded = min(max(loaded, hi), spec.end)
                    chunk_start += kv.shape[2]
                    if chunk_start >= stop:
                        return loaded
                if len(tensors) < len(keys):
                    return loaded
        finally:
            ahead.abandon()
        return loaded

    def close(self) -> None:
        self._read_ahead.close()

    def _write(self, piece: torch.Tensor, table: torch.Tensor, start: int, end: int) -> None:
        paged = self._paged
        tokens = end - start
        index = paged.index(table, start, end)
        slot = self._staging.next_slot()
        device = paged.scratch_view(slot.device, tokens)
        if piece.device == paged.device or slot.event is None:
            paged.from_chunk(piece, device)
        else:
            host = paged.scratch_view(slot.host, tokens)
            paged.from_chunk(piece, host)
            device.copy_(host, non_blocking=True)
        paged.scatter(index, device)
        if slot.event is not None:
            slot.event.record()
