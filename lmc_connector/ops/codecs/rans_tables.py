"""The rANS bitstream's constants and coding tables (shared by the torch and native coders).

State x is a 32-bit integer in [L, 2**31) (L = 2**15); output words are 16 bits; probabilities
are quantized to PREC bits. Symbols are coded as `distribution * alphabet + symbol` against a
family of K distributions over one alphabet of at most MAX_SYMBOLS symbols.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PREC = 12
M = 1 << PREC
L = 1 << 15
MAX_SYMBOLS = 64
SYM_BITS = 7  # decode table: sym | bias << SYM_BITS | freq << (SYM_BITS + PREC)
# No symbol gets more than M - MIN_ESCAPE of the range, so every symbol costs at least
# log2(M / (M - 64)) bits: a blob of W words cannot describe more than ~700 * W symbols.
MIN_ESCAPE = 64
SYMBOLS_PER_WORD_BOUND = 1500
_ENC_C = 13  # encode table: freq | cum << _ENC_C (bit 12 stays 0, see rans_torch.encode)


@dataclass(frozen=True)
class RansTables:
    """Quantized frequencies for K distributions over an alphabet of A symbols (int32)."""

    alphabet: int
    enc: torch.Tensor  # [K * A]: freq | cum << 13
    dec: torch.Tensor  # [K * M]: sym | (slot - cum) << 7 | freq << 19

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
    """Tables for the distributions `probs` [K, A] (rows need not be normalised)."""
    freq = quantize_probs(probs)
    k, a = freq.shape
    cum = torch.cumsum(freq, 1) - freq
    enc = (freq | (cum << _ENC_C)).reshape(-1)
    slots = torch.arange(M).expand(k, M)
    sym = torch.searchsorted(torch.cumsum(freq, 1), slots.contiguous(), right=True)
    f = freq.gather(1, sym)
    bias = slots - cum.gather(1, sym)
    dec = (sym | (bias << SYM_BITS) | (f << (SYM_BITS + PREC))).reshape(-1)
    return RansTables(a, enc.to(torch.int32), dec.to(torch.int32))
