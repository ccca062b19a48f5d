"""Memory for encoded chunks read back from a store, cut from buffers already touched.

An encoded chunk is a few hundred KiB to a few MiB, a different size every time,
so it cannot reuse a free buffer of its own shape the way a plain chunk does.
Instead, free buffers of the pool serve as slabs: consecutive byte ranges are cut
from one slab until it is full. A slab goes back to the pool once no range cut
from it is alive (nobody can see its memory any more); until then it stays
retired. Without a slab to cut from, a range is fresh memory.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

#: Ranges start on cache-line boundaries (codecs read sections as wider integers and floats).
ALIGN = 64
# Storage users of a tensor nobody else sees: the tensor and the wrapper made to ask.
_OWNER_STORAGE_USES = 2


def viewed_elsewhere(t: torch.Tensor) -> bool:
    """Whether another tensor (a view, a range) shares the memory of `t`."""
    return int(torch._C._storage_Use_Count(t.untyped_storage()._cdata)) > _OWNER_STORAGE_USES


class ByteSlabs:
    """Byte ranges cut from slabs: free pool buffers of at least the range's size.

    Owns the slab being cut and the retired ones (full, some range still
    alive), at most `max_bytes` of slabs in all. `draw(nbytes)` takes a free
    buffer of at least `nbytes` from the pool (None when it has none);
    `give_back(buffer)` returns a slab whose ranges are all gone. Any thread
    may take ranges (one lock).
    """

    def __init__(
        self,
        draw: Callable[[int], torch.Tensor | None],
        give_back: Callable[[torch.Tensor], None],
        max_bytes: int,
    ) -> None:
        self.max_bytes = max_bytes
        self._draw = draw
        self._give_back = give_back
        self._slab: torch.Tensor | None = None
        self._cut = 0
        self._retired: list[torch.Tensor] = []
        self._slab_bytes = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        """An uninitialised uint8 tensor of `nbytes`: a range of a slab where one has room."""
        with self._lock:
            if self._slab is None or self._cut + nbytes > self._slab.nbytes:
                self._next_slab(nbytes)
            if self._slab is None:
                return torch.empty(nbytes, dtype=torch.uint8)
            start = self._cut
            self._cut += -(-nbytes // ALIGN) * ALIGN
            return self._slab.view(-1).view(torch.uint8)[start : start + nbytes]

    def _next_slab(self, nbytes: int) -> None:
        """Retire the slab being cut and start one with room for `nbytes` (none if the pool
        has no buffer that large or the slabs held are at their bound)."""
        if self._slab is not None:
            self._retired.append(self._slab)
            self._slab = None
        kept = []
        for retired in self._retired:
            if viewed_elsewhere(retired):
                kept.append(retired)
            else:
                self._slab_bytes -= retired.nbytes
                self._give_back(retired)
        self._retired = kept
        slab = self._draw(nbytes) if self._slab_bytes + nbytes <= self.max_bytes else None
        if slab is not None and self._slab_bytes + slab.nbytes > self.max_bytes:
            self._give_back(slab)
            slab = None
        if slab is not None:
            self._slab, self._cut = slab, 0
            self._slab_bytes += slab.nbytes
