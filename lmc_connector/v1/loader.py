"""Loads: cached chunks into vLLM's paged cache, chunk by chunk, before the forward.

A load never holds the whole prefix on the device: chunks are fetched a few
at a time (encoded ones decoded together, on `codec_device`), and each one
goes through a staging slot (page-locked on CUDA) into the paged cache with
one indexed op per layer. While a round is decoded and written, a read-ahead
thread reads the next round from the tiers (a shared store's round trips, the
promotion into the CPU tier). Device memory used: the staging ring plus one
decode batch; on the CPU, chunks are decoded into the same few buffers every
round (`decode_buffers.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import torch

from lmc_connector.cache import CacheEngine, Chunk
from lmc_connector.control.agent.affinity import widen_current_thread
from lmc_connector.ops.paged import PagedKV
from lmc_connector.v1.decode_buffers import DecodeBuffers
from lmc_connector.v1.metadata import LoadSpec
from lmc_connector.v1.staging import Staging

#: Chunks fetched (and encoded ones decoded) per round.
FETCH_CHUNKS = 4
#: Longest wait for a round's chunks from the tiers (each store request has its own, much
#: shorter, timeout): past it the load ends there and vLLM recomputes the rest.
READ_WAIT_S = 60.0

logger = logging.getLogger(__name__)


class ChunkLoader:
    """Owns the load path's staging ring, its read-ahead thread and, decoding on the CPU, its
    decode buffers. `load` runs on vLLM's model-runner thread; the read-ahead thread only
    reads chunks from the engine's tiers."""

    def __init__(self, engine: CacheEngine, paged: PagedKV, codec_device: torch.device) -> None:
        self._engine = engine
        self._paged = paged
        self._codec_device = codec_device
        self._staging = Staging(paged, engine.layout.chunk_size)
        layout = engine.layout
        self._decode_into = (
            DecodeBuffers(layout.shape(layout.chunk_size), layout.torch_dtype, FETCH_CHUNKS)
            if codec_device.type == "cpu"
            else None  # torch's caching allocator already reuses device memory
        )
        # Started by the first load, on vLLM's model-runner thread (bound to one core): the
        # read-ahead thread runs on every CPU the process may use instead.
        self._read_ahead = ThreadPoolExecutor(
            1, thread_name_prefix="lmc-load-read", initializer=widen_current_thread
        )

    def close(self) -> None:
        self._read_ahead.shutdown(wait=False, cancel_futures=True)

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
        rounds = [spec.keys[i : i + FETCH_CHUNKS] for i in range(0, len(spec.keys), FETCH_CHUNKS)]
        reading = self._read_ahead.submit(self._engine.read, rounds[0]) if rounds else None
        for n, keys in enumerate(rounds):
            chunks = self._wait(reading, spec.req_id)
            whole = len(chunks) == len(keys)
            more = whole and n + 1 < len(rounds)
            reading = self._read_ahead.submit(self._engine.read, rounds[n + 1]) if more else None
            tensors = self._engine.tensors(keys, chunks, self._codec_device, self._decode_into)
            for kv in tensors:
                lo, hi = max(chunk_start, spec.start), min(chunk_start + kv.shape[2], stop)
                if hi > lo:
                    self._write(kv[:, :, lo - chunk_start : hi - chunk_start], table, lo, hi)
                    loaded = min(max(loaded, hi), spec.end)
                chunk_start += kv.shape[2]
                if chunk_start >= stop:
                    return loaded
            if len(tensors) < len(keys):
                return loaded
        return loaded

    @staticmethod
    def _wait(reading: Future[list[Chunk]] | None, req_id: str) -> Sequence[Chunk]:
        """The chunks a round's read found (the prefix up to its first miss); none when it
        took longer than READ_WAIT_S."""
        assert reading is not None
        try:
            return reading.result(timeout=READ_WAIT_S)
        except FutureTimeout:
            logger.warning("%s: reading cached chunks took over %.0f s", req_id, READ_WAIT_S)
            return []

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
