"""Where a chunk built from bytes (decoded, or received from a store) gets its memory."""

from __future__ import annotations

from collections.abc import Callable

import torch

#: (shape, dtype) -> an uninitialised contiguous tensor, on the device the caller decodes on.
Allocator = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


def empty_cpu(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)
