"""Memory for the chunks the load path decodes, reused round after round.

A decoded chunk lives only until the loader has written it into the paged
cache. Fresh memory for each would be touched for the first time on every
load, or again after the allocator handed it back to the kernel, and inside
vLLM's CPU worker a first touch is slow: about 20 us per 4 KiB page measured
in the worker on our 2-core test machines (77 ms for 16 MiB, about what
decoding four float32 chunks of the benchmark model costs), against about
3 us in a plain process. So on the CPU the loader has the codecs decode into
these buffers instead.
"""

from __future__ import annotations

import math

import torch


class DecodeBuffers:
    """`count` flat CPU buffers of one full chunk each, handed out in turn (made on first
    use): a buffer is handed out again `count` calls later, so what one loader round decodes
    (at most `count` chunks, written before the next round) is never overwritten while in use.
    Another shape or dtype than the layout's gets memory of its own. Used by vLLM's
    model-runner thread only."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, count: int) -> None:
        if count < 1:
            raise ValueError(f"count must be positive, got {count}")
        self._numel = math.prod(shape)
        self._dtype = dtype
        self._count = count
        self._buffers: list[torch.Tensor] = []
        self._next = 0

    def __call__(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        if dtype != self._dtype or numel > self._numel:
            return torch.empty(shape, dtype=dtype)
        if self._next == len(self._buffers):
            self._buffers.append(torch.empty(self._numel, dtype=self._dtype))
        buffer = self._buffers[self._next]
        self._next = (self._next + 1) % self._count
        return buffer[:numel].view(shape)
