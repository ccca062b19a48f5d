"""Builders of K/V chunks for the codec tests."""

from __future__ import annotations

import torch


def attention_like(
    shape: tuple[int, ...], count: int, seed: int, dtype: torch.dtype = torch.float16
) -> list[torch.Tensor]:
    """Chunks of one fixed model (per layout) whose K and V are linear maps of one hidden
    state per token, as in attention (so their joint vector is correlated), and in chunks of 8
    tokens or more a sink token first: V almost zero. `seed` draws the hidden states."""
    planes, layers, tokens, channels = shape
    hidden = channels
    model = torch.Generator().manual_seed(planes * 1000 + layers * 100 + channels)
    maps = torch.randn(planes, layers, hidden, channels, generator=model) / hidden**0.5
    bias = torch.randn(planes, layers, 1, channels, generator=model)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        h = torch.randn(layers, tokens, hidden, generator=g) * torch.linspace(2, 0.2, hidden)
        kv = torch.einsum("lth,plhc->pltc", h, maps) + bias
        if tokens >= 8:
            kv[-1, :, 0] *= 0.01
        out.append(kv.to(dtype))
    return out
