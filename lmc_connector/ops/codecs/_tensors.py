"""Helpers shared by the codecs: bytes <-> tensors, devices."""

from __future__ import annotations

import numpy as np
import torch


def to_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of `t` (moved to CPU, made contiguous)."""
    t = t.detach().contiguous()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.view(torch.uint8).numpy().tobytes()


def from_bytes(
    buf: memoryview | bytes, dtype: torch.dtype, count: int, device: torch.device
) -> torch.Tensor:
    """A tensor of `count` items of `dtype` read from `buf` (exactly count * itemsize bytes)."""
    if count == 0:
        return torch.empty(0, dtype=dtype, device=device)
    raw = np.frombuffer(buf, dtype=np.uint8, count=count * dtype.itemsize)
    t = torch.from_numpy(raw.copy()).view(dtype)
    return t.to(device, non_blocking=False)


def resolve_device(device: torch.device | str | None) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)
