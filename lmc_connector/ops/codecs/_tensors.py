"""Helpers shared by the codecs: bytes <-> tensors, devices."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

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


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in the float tensor t, checked on the bits (for 16-bit floats
    several times faster than torch.isfinite on CPU): the exponent is not all ones."""
    if t.dtype in (torch.float16, torch.bfloat16):
        top = 0x7C00 if t.dtype == torch.float16 else 0x7F80
        return bool((t.view(torch.int16) & 0x7FFF).amax() < top)
    return bool(torch.isfinite(t).all())


def resolve_device(device: torch.device | str | None) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


T = TypeVar("T")


def group_by(items: Sequence[T], key: Callable[[T], Hashable]) -> list[list[int]]:
    """Indices of `items` grouped by `key`, groups in order of first appearance."""
    groups: dict[Hashable, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item), []).append(i)
    return list(groups.values())
