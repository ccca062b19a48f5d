"""Vectorised interleaved rANS over many streams stepped in lockstep with torch ops.

State x is 32 bits in [L, L << 16) held in int64; output words are 16 bits; probabilities are
quantized to PREC bits. Each stream emits at most one word per symbol, so the words of step t
(in stream order) form one contiguous run of the output: the decoder finds each stream's word
with a cumulative sum of its "needs a word" flags, and no per-stream lengths are stored. The
Python loop runs over steps (symbols per stream) only; everything inside is a whole-tensor op,
so the same code runs on CPU and CUDA, and a batch of same-shaped chunks steps together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PREC = 12
M = 1 << PREC
L = 1 << 16
MAX_SYMBOLS = 64
# No symbol gets more than M - MIN_ESCAPE of the range, so every symbol costs at least
# log2(M / (M - 64)) bits: a blob of W words cannot describe more than ~700 * W symbols.
MIN_ESCAPE = 64
SYMBOLS_PER_WORD_BOUND = 1500


@dataclass(frozen=True)
class RansTables:
    """Quantized frequencies for K distributions over an alphabet of A symbols."""

    alphabet: int
    enc: torch.Tensor  # [K * A] int64: freq | cum << 16
    dec: torch.Tensor  # [K * M] int64: sym | freq << 8 | (slot - cum) << 21

    def to(self, device: torch.device) -> RansTables:
        if self.enc.device == device:
            return self
        return RansTables(self.alphabet, self.enc.to(device), self.dec.to(device))


def quantize_probs(probs: torch.Tensor) -> torch.Tensor:
    """Integer frequencies [K, A] summing to M, each >= 1, none above M - MIN_ESCAPE."""
    _k, a = probs.shape
    if not 2 <= a <= MAX_SYMBOLS:
        raise ValueError(f"alphabet of {a} symbols is outside what the coder supports")
    p = probs.double().clamp_min(0)
    p = p / p.sum(1, keepdim=True)
    cap = 1.0 - 2.0 * MIN_ESCAPE / M
    top = p.max(1, keepdim=True)
    over = top.values > cap
    rest = (1 - top.values).clamp_min(1e-12)
    scaled = torch.where(torch.arange(a)[None] == top.indices, cap, p * (1 - cap) / rest)
    p = torch.where(over, scaled, p)
    freq = 1 + torch.floor(p * (M - a)).long()
    deficit = M - freq.sum(1)
    freq.scatter_add_(1, freq.argmax(1, keepdim=True), deficit[:, None])
    return freq


def build_tables(probs: torch.Tensor) -> RansTables:
    freq = quantize_probs(probs)
    k, a = freq.shape
    cum = torch.cumsum(freq, 1) - freq
    enc = (freq | (cum << 16)).reshape(-1)
    slots = torch.arange(M).expand(k, M)
    sym = torch.searchsorted(torch.cumsum(freq, 1), slots.contiguous(), right=True)
    f = freq.gather(1, sym)
    bias = slots - cum.gather(1, sym)
    dec = (sym | (f << 8) | (bias << 21)).reshape(-1)
    return RansTables(a, enc, dec)


def encode(
    symbols: torch.Tensor, dists: torch.Tensor, tokens: int, tables: RansTables
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Encode symbols [steps, chunks, streams] (uint8) where step t of stream s uses the
    distribution dists[t // tokens, chunk, s]. Returns each chunk's words (int32 holding 16-bit
    values, in decoder order) and the final states [chunks, streams]."""
    steps, nb, s = symbols.shape
    dev = symbols.device
    code = symbols.to(torch.int32) + (dists.to(torch.int32) * tables.alphabet).repeat_interleave(
        tokens, 0
    )
    x = torch.full((nb, s), L, dtype=torch.int64, device=dev)
    words = torch.empty((steps, nb, s), dtype=torch.int32, device=dev)
    flags = torch.empty((steps, nb, s), dtype=torch.bool, device=dev)
    # Preallocated work buffers: per-step allocations of this size hit mmap/munmap on CPU.
    idx, e, f, tmp, q = (torch.empty((nb, s), dtype=torch.int64, device=dev) for _ in range(5))
    shift = 32 - PREC
    for t in range(steps - 1, -1, -1):
        idx.copy_(code[t])
        torch.index_select(tables.enc, 0, idx.view(-1), out=e.view(-1))
        torch.bitwise_and(e, 0xFFFF, out=f)
        torch.bitwise_left_shift(f, shift, out=tmp)
        flag = flags[t]
        torch.ge(x, tmp, out=flag)
        words[t].copy_(x)
        torch.bitwise_right_shift(x, 16, out=tmp)
        torch.where(flag, tmp, x, out=q)
        x, q = q, x
        torch.div(x, f, rounding_mode="floor", out=q)
        f.neg_().add_(M)
        q.mul_(f)
        x.add_(q)
        e.bitwise_right_shift_(16)
        x.add_(e)
    out = [(words[:, b][flags[:, b]] & 0xFFFF) for b in range(nb)]
    return out, x


def decode(
    words: list[torch.Tensor],
    states: torch.Tensor,
    dists: torch.Tensor,
    tokens: int,
    tables: RansTables,
) -> tuple[torch.Tensor, bool]:
    """Inverse of `encode`: symbols [steps, chunks, streams] (uint8) and whether every stream
    ended in the initial state having consumed exactly its words (False: corrupt input)."""
    nblk, nb, s = dists.shape
    steps = nblk * tokens
    dev = states.device
    sizes = torch.tensor([len(w) for w in words], dtype=torch.int64, device=dev)
    flat = torch.cat(
        [w.to(torch.int64) for w in words] + [torch.zeros(1, dtype=torch.int64, device=dev)]
    )
    ptr = (torch.cumsum(sizes, 0) - sizes - 1)[:, None].contiguous()
    last = flat.numel() - 1
    base = dists.to(torch.int64) * M
    out = torch.empty((steps, nb, s), dtype=torch.uint8, device=dev)
    x = states.clone()
    e, tmp, idx, cs = (torch.empty((nb, s), dtype=torch.int64, device=dev) for _ in range(4))
    need = torch.empty((nb, s), dtype=torch.bool, device=dev)
    for t in range(steps):
        torch.bitwise_and(x, M - 1, out=idx)
        idx.add_(base[t // tokens])
        torch.index_select(tables.dec, 0, idx.view(-1), out=e.view(-1))
        out[t].copy_(e)
        x.bitwise_right_shift_(PREC)
        torch.bitwise_right_shift(e, 8, out=tmp)
        tmp.bitwise_and_(0x1FFF)
        x.mul_(tmp)
        e.bitwise_right_shift_(21)
        x.add_(e)
        torch.lt(x, L, out=need)
        torch.cumsum(need, 1, out=cs)
        torch.add(cs, ptr, out=idx)
        idx.clamp_(0, last)
        torch.index_select(flat, 0, idx.view(-1), out=tmp.view(-1))
        torch.bitwise_left_shift(x, 16, out=e)
        e.bitwise_or_(tmp)
        torch.where(need, e, x, out=tmp)
        x, tmp = tmp, x
        ptr.add_(cs[:, -1:])
    ends = (torch.cumsum(sizes, 0) - 1)[:, None]
    ok = bool((x == L).all()) and bool((ptr == ends).all())
    return out, ok
