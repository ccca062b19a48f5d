"""Interleaved rANS over many streams: one bitstream, two coders.

`encode` and `decode` take the symbols of a batch of independent runs laid out as
[steps, runs, streams] (a run is a chunk, or one lane of a chunk: a codec splits a chunk's
streams into lanes so that its runs can be coded in parallel) and pick the coder: the native
C coder (rans_native.py) for CPU tensors where it could be built, its runs spread over
threads (threads.py), else the vectorised torch coder (rans_torch.py), which
runs on any device. Both write and read the same bytes, so a chunk encoded on a GPU decodes
on a CPU and the other way round.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lmc_connector.ops.codecs import rans_native, rans_torch, threads
from lmc_connector.ops.codecs.rans_tables import (
    MAX_SYMBOLS,
    PREC,
    SYMBOLS_PER_WORD_BOUND,
    L,
    M,
    RansTables,
    build_tables,
)

__all__ = [
    "MAX_SYMBOLS",
    "PREC",
    "SYMBOLS_PER_WORD_BOUND",
    "L",
    "M",
    "RansTables",
    "build_tables",
    "decode",
    "encode",
    "native_on",
]


def native_on(device: torch.device) -> bool:
    """Whether `encode` and `decode` use the native coder for tensors on `device`."""
    return device.type == "cpu" and rans_native.library() is not None


def encode(codes: torch.Tensor, tables: RansTables) -> list[tuple[bytes, bytes]]:
    """Encode codes [steps, runs, streams] (int16: distribution * alphabet + symbol).
    Returns each run's (words as u16 LE, final states as u32 LE)."""
    lib = rans_native.library() if codes.device.type == "cpu" else None
    if lib is not None:
        codes = codes.to(torch.int16).contiguous()

        def run(r: int) -> tuple[bytes, bytes]:
            return rans_native.encode_run(lib, codes, r, tables)

        return threads.parallel(run, codes.shape[1], threads.encode_threads())
    words, states = rans_torch.encode(codes, tables)
    return [
        (_bytes(w.to(torch.int16)), _bytes(s)) for w, s in zip(words, states.unbind(0), strict=True)
    ]


def decode(
    words: Sequence[bytes | memoryview],
    states: torch.Tensor,
    dists: torch.Tensor,
    tokens: int,
    tables: RansTables,
) -> tuple[torch.Tensor, bool]:
    """Inverse of `encode`: symbols [steps, runs, streams] (uint8) on the device of `states`
    and whether every stream ended in the initial state having consumed exactly its words
    (False: corrupt input). `states` [runs, streams] must lie in [L, 2**31) and `dists`
    [blocks, runs, streams] index the tables (the caller checks both); a block holds
    `tokens` steps."""
    nblk, runs, s = dists.shape
    lib = rans_native.library() if states.device.type == "cpu" else None
    if lib is None:
        flat, sizes = rans_torch.word_buffer(words, s, states.device)
        return rans_torch.decode(flat, sizes, states, dists, tokens, tables)
    out = torch.empty((nblk * tokens, runs, s), dtype=torch.uint8)

    def run(r: int) -> bool:
        return rans_native.decode_run(lib, words[r], states[r], dists[:, r], tokens, tables,
                                      out[:, r])  # fmt: skip

    return out, all(threads.parallel(run, runs, threads.decode_threads()))


def _bytes(t: torch.Tensor) -> bytes:
    return np.ascontiguousarray(t.detach().cpu().numpy()).tobytes()
