"""Vectorised interleaved rANS over many streams stepped in lockstep with torch ops.

The bitstream is described in rans.py. Each stream emits at most one word per symbol, so the
words of step t (in stream order) form one contiguous run of the output: the decoder finds each
stream's word with a cumulative sum of its "needs a word" flags. The Python loop runs over
steps (symbols per stream) only; everything inside is a whole-tensor op, so the same code runs
on CPU and CUDA, and a batch of same-shaped chunks steps together. This is the coder of the
GPU path and the CPU fallback when the native coder (rans_native.py) cannot be built.

Speed: every step is ~16 int32 ops on preallocated buffers, with no `torch.where` and no bool
tensors (both are several times slower than int32 arithmetic on CPU); renormalisation is a
shift by `flag << 4`, and the encoder compacts its words in the loop (cumsum + scatter_)
instead of a masked select over all steps afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lmc_connector.ops.codecs.rans_tables import _ENC_C, PREC, SYM_BITS, L, M, RansTables


def encode(codes: torch.Tensor, tables: RansTables) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Encode codes [steps, chunks, streams] (int16/int32: distribution * alphabet + symbol).
    Returns each chunk's words (int32 whose low 16 bits are the word, in decoder order) and
    the final states [chunks, streams] (int32)."""
    steps, nb, s = codes.shape
    dev = codes.device
    x = torch.full((nb, s), L, dtype=torch.int32, device=dev)
    # Chunk b's words fill region b of `buf` from its end backwards (steps run backwards);
    # index 0 is a dump slot for streams that emit nothing this step. Pages never written
    # (most of the worst-case size) are never touched.
    region = steps * s
    buf = torch.empty(1 + nb * region, dtype=torch.int32, device=dev)
    ptr = (torch.arange(1, nb + 1, dtype=torch.int32, device=dev) * region + 1)[:, None]
    idx, e, t1, flag, cs = (torch.empty((nb, s), dtype=torch.int32, device=dev) for _ in range(5))
    pos = torch.empty((nb, s), dtype=torch.int64, device=dev)  # scatter_ wants int64
    # x // freq in float64 (exact: x < 2**31, freq < 2**12) is ~4x faster than int division.
    xd, fd = (torch.empty((nb, s), dtype=torch.float64, device=dev) for _ in range(2))
    for t in range(steps - 1, -1, -1):
        idx.copy_(codes[t])
        torch.index_select(tables.enc, 0, idx.view(-1), out=e.view(-1))
        # freq << 19 straight from the packed entry: cum's bits wrap out, bit 12 is 0.
        torch.bitwise_left_shift(e, 19, out=t1)
        torch.ge(x, t1, out=flag)
        torch.cumsum(flag, 1, out=cs)
        ptr = ptr - cs[:, -1:]
        cs.add_(ptr - 1)
        cs.mul_(flag)
        pos.copy_(cs)
        buf.scatter_(0, pos.view(-1), x.view(-1))
        flag.bitwise_left_shift_(4)
        x.bitwise_right_shift_(flag)
        torch.bitwise_and(e, (1 << PREC) - 1, out=t1)
        xd.copy_(x)
        fd.copy_(t1)
        xd.div_(fd, rounding_mode="trunc")
        cs.copy_(xd)
        x.addcmul_(cs, t1, value=-1)
        x.add_(cs, alpha=M)
        e.bitwise_right_shift_(_ENC_C)
        x.add_(e)
    ends = torch.arange(1, nb + 1) * region + 1
    starts = ptr.view(-1).tolist()
    out = [buf[int(a) : int(b)] for a, b in zip(starts, ends, strict=True)]
    return out, x


def word_buffer(
    sections: Sequence[bytes | memoryview], streams: int, device: torch.device
) -> tuple[torch.Tensor, list[int]]:
    """The chunks' little-endian u16 word sections as one int32 tensor laid out for `decode`
    ([0] + words... + streams + 1 zeros), and each chunk's word count."""
    sizes = [len(w) // 2 for w in sections]
    flat = np.zeros(1 + sum(sizes) + streams + 1, dtype=np.int32)
    at = 1
    for w, n in zip(sections, sizes, strict=True):
        flat[at : at + n] = np.frombuffer(w, dtype="<u2", count=n)
        at += n
    return torch.from_numpy(flat).to(device), sizes


def decode(
    flat: torch.Tensor,
    sizes: Sequence[int],
    states: torch.Tensor,
    dists: torch.Tensor,
    tokens: int,
    tables: RansTables,
) -> tuple[torch.Tensor, bool]:
    """Inverse of `encode` on a `word_buffer`: symbols [steps, chunks, streams] (uint8) and
    whether every stream ended in the initial state having consumed exactly its words (False:
    corrupt input). `states` must lie in [L, 2**31) and `dists` index the tables (the caller
    checks both); the padding keeps every gather in range whatever the words say."""
    nblk, nb, s = dists.shape
    steps = nblk * tokens
    dev = states.device
    ends_list = np.cumsum(sizes).tolist()
    ptr = torch.tensor(
        [e - n for e, n in zip(ends_list, sizes, strict=True)], dtype=torch.int32, device=dev
    )[:, None]
    top = flat.numel() - s - 1
    base = dists.to(torch.int32) << PREC
    out = torch.empty((steps, nb, s), dtype=torch.uint8, device=dev)
    x = states.to(torch.int32).clone()
    idx, e, t1, t2, need = (torch.empty((nb, s), dtype=torch.int32, device=dev) for _ in range(5))
    for t in range(steps):
        torch.bitwise_and(x, M - 1, out=idx)
        idx.bitwise_or_(base[t // tokens])
        torch.index_select(tables.dec, 0, idx.view(-1), out=e.view(-1))
        out[t].copy_(e)
        # x = freq * (x >> PREC) + bias, with bias + (freq << PREC) = e >> SYM_BITS.
        torch.bitwise_right_shift(x, PREC, out=t2)
        t2.sub_(M)
        torch.bitwise_right_shift(e, SYM_BITS + PREC, out=t1)
        e.bitwise_right_shift_(SYM_BITS)
        torch.addcmul(e, t2, t1, out=x)
        torch.lt(x, L, out=need)
        torch.cumsum(need, 1, out=t1)
        pc = ptr.clamp(max=top)
        t1.add_(pc)
        ptr = ptr + (t1[:, -1:] - pc)
        torch.index_select(flat, 0, t1.view(-1), out=t2.view(-1))
        t2.mul_(need)
        need.bitwise_left_shift_(4)
        x.bitwise_left_shift_(need)
        x.bitwise_or_(t2)
    out.bitwise_and_((1 << SYM_BITS) - 1)
    ends = torch.tensor(ends_list, dtype=torch.int32, device=dev)[:, None]
    ok = bool((x == L).all()) and bool((ptr == ends).all())
    return out, ok
