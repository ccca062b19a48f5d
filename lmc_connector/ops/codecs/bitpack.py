"""Fixed-width bit packing of small non-negative integers (little-endian bit order), done with
numpy on the host: the packed bytes go into a blob there anyway."""

from __future__ import annotations

import numpy as np
import torch


def packed_size(count: int, width: int) -> int:
    return (count * width + 7) // 8


def pack(values: torch.Tensor, width: int) -> bytes:
    """The low `width` bits of each of `values` (integers, any shape, any device)."""
    if width == 0 or values.numel() == 0:
        return b""
    v = values.detach().reshape(-1).to("cpu", torch.int64).numpy()
    bits = ((v[:, None] >> np.arange(width, dtype=np.int64)) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little").tobytes()


def unpack(buf: bytes | memoryview, count: int, width: int, device: torch.device) -> torch.Tensor:
    """Inverse of `pack`: `count` int64 values on `device` (`buf` holds at least
    packed_size(count, width) bytes)."""
    if width == 0 or count == 0:
        return torch.zeros(count, dtype=torch.int64, device=device)
    raw = np.frombuffer(buf, dtype=np.uint8, count=packed_size(count, width))
    bits = np.unpackbits(raw, count=count * width, bitorder="little").reshape(count, width)
    values = bits.astype(np.int64) @ (np.int64(1) << np.arange(width, dtype=np.int64))
    return torch.from_numpy(values).to(device)
