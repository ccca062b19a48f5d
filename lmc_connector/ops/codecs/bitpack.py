"""Fixed-width bit packing of small non-negative integers (little-endian bit order)."""

from __future__ import annotations

import torch


def packed_size(count: int, width: int) -> int:
    return (count * width + 7) // 8


def pack(values: torch.Tensor, width: int) -> torch.Tensor:
    """uint8 tensor holding the low `width` bits of each of `values` (int64, 1-D)."""
    shifts = torch.arange(width, device=values.device)
    bits = ((values[:, None] >> shifts) & 1).reshape(-1)
    pad = (-bits.numel()) % 8
    bits = torch.cat([bits, bits.new_zeros(pad)]).view(-1, 8)
    weights = 1 << torch.arange(8, device=values.device)
    return (bits * weights).sum(1).to(torch.uint8)


def unpack(data: torch.Tensor, count: int, width: int) -> torch.Tensor:
    """Inverse of `pack`: `count` int64 values."""
    bits = (data.to(torch.int64)[:, None] >> torch.arange(8, device=data.device)) & 1
    bits = bits.reshape(-1)[: count * width].view(count, width)
    return (bits << torch.arange(width, device=data.device)).sum(1)
