"""The rANS coder's C kernels (`_rans.c`, built by native.py), with a checked fallback.

The torch coder (rans_torch.py) pays ~16 tensor ops per step; on a CPU that is most of a
chunk's coding time. The same loops in C are one pass over the symbols. Before the kernels
are used, a self-test checks that they produce the torch coder's bytes; where the library
could not be built or fails it, `library()` is None and the codecs use the torch coder: same
bitstream, slower.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from lmc_connector.ops.codecs import native
from lmc_connector.ops.codecs.rans_tables import L, RansTables


def library() -> ctypes.CDLL | None:
    """The kernels library once its coder passed the self-test, or None where the torch
    coder must be used."""
    return native.checked("rANS coder", _self_test)


def _self_test(lib: ctypes.CDLL) -> bool:
    from lmc_connector.ops.codecs import rans_torch
    from lmc_connector.ops.codecs.rans_tables import build_tables

    g = torch.Generator().manual_seed(0)
    tables = build_tables(torch.rand(3, 5, generator=g) ** 4)
    dists = torch.randint(0, 3, (2, 1, 7), generator=g)
    syms = torch.randint(0, 5, (2 * 11, 1, 7), generator=g)
    codes = (dists.repeat_interleave(11, 0) * 5 + syms).to(torch.int16)
    want_words, want_states = rans_torch.encode(codes, tables)
    words, states = encode_run(lib, codes, 0, tables)
    if words != want_words[0].to(torch.int16).numpy().tobytes():
        return False
    if states != want_states[0].numpy().tobytes():
        return False
    got = torch.empty((22, 7), dtype=torch.uint8)
    ok = decode_run(lib, words, torch.from_numpy(_u32(states)), dists[:, 0], 11, tables, got)
    return ok and bool(torch.equal(got.long(), syms[:, 0]))


def _u32(buf: bytes | memoryview) -> np.ndarray:
    return np.frombuffer(buf, dtype="<u4").astype(np.int32)


def _ptr(a: np.ndarray | torch.Tensor) -> int:
    return int(a.ctypes.data if isinstance(a, np.ndarray) else a.data_ptr())


def encode_run(
    lib: ctypes.CDLL, codes: torch.Tensor, run: int, tables: RansTables
) -> tuple[bytes, bytes]:
    """The words (u16 LE) and final states (u32 LE) of run `run` of codes [steps, runs,
    streams] (contiguous int16, CPU), as rans_torch.encode gives them."""
    steps, runs, streams = codes.shape
    assert tables.enc.device.type == "cpu" and codes.device.type == "cpu"
    cap = steps * streams + 1
    out = np.empty(cap, dtype=np.uint16)
    states = np.empty(streams, dtype=np.uint32)
    n = lib.lmc_rans_encode(
        codes.data_ptr() + run * streams * 2, steps, streams, runs * streams,
        tables.enc.data_ptr(), tables.enc.numel(), _ptr(states), _ptr(out), cap,
    )  # fmt: skip
    if n < 0:
        raise ValueError("rANS codes out of the tables' range")
    return out[cap - n :].tobytes(), states.tobytes()


def decode_run(
    lib: ctypes.CDLL,
    words: bytes | memoryview,
    states: torch.Tensor,
    dists: torch.Tensor,
    tokens: int,
    tables: RansTables,
    out: torch.Tensor,
) -> bool:
    """Decode one run into `out` [nblk * tokens, streams] (uint8, rows contiguous, may be a
    strided view): True when every stream ended in the initial state having consumed exactly
    the run's words."""
    assert tables.dec.device.type == "cpu" and out.device.type == "cpu"
    nblk, streams = dists.shape
    n = len(words) // 2
    buf = np.frombuffer(words, dtype="<u2", count=n)  # read in place: no copy to fault in
    if buf.ctypes.data % 2:
        buf = buf.copy()
    x = states.to(torch.int32).numpy().astype(np.uint32)
    d = dists.to(torch.int32).contiguous()
    used = lib.lmc_rans_decode(
        _ptr(buf), n, _ptr(x), d.data_ptr(), nblk, tokens, streams, tables.dec.data_ptr(),
        tables.dec.numel(), out.data_ptr(), out.stride(0),
    )  # fmt: skip
    return used == n and len(words) % 2 == 0 and bool((x == L).all())
