"""Reuse of chunk buffers, so a put copies into warm memory instead of page-faulting.

Allocating a fresh 32 MiB tensor per put costs more in page faults than the
copy itself. Buffers of removed chunks are kept here and handed out again,
but only when nothing else can still see them: no other Python reference to
the chunk or its tensor, and no view of its storage. Anything in doubt is
simply freed. The bytes of encoded chunks are cut from free buffers too
(`slabs.py`).
"""

from __future__ import annotations

import math
import sys
import threading
from collections import defaultdict

import torch

from lmc_connector.cache.chunk import Chunk
from lmc_connector.cache.slabs import ByteSlabs, viewed_elsewhere

Shape = tuple[tuple[int, ...], torch.dtype]

# References sys.getrefcount sees when the pool is the sole owner: the caller's
# variable, the parameter, and getrefcount's own argument.
_OWNER_CHUNK_REFS = 3
# The chunk's slot, the local variable, and getrefcount's argument.
_OWNER_TENSOR_REFS = 3


def _sole_owner_refs() -> tuple[int, int]:
    """What getrefcount says here for a chunk and its tensor that only the caller holds, in
    a call shaped like `recycle`'s."""

    def probe(chunk: Chunk) -> tuple[int, int]:
        kv = chunk.kv
        return sys.getrefcount(chunk), sys.getrefcount(kv)

    held = Chunk(1, kv=torch.empty(1))
    return probe(held)


#: Whether this interpreter counts references as the two constants assume (CPython may count
#: fewer, e.g. borrowed stack references): if not, buffers are never recycled, since an
#: extra holder could go unseen and its memory be overwritten.
_REFCOUNTS_AS_ASSUMED = _sole_owner_refs() == (_OWNER_CHUNK_REFS, _OWNER_TENSOR_REFS)


class BufferPool:
    """Free CPU buffers by (shape, dtype), at most `max_bytes` in all, and the slabs that
    encoded chunks' bytes are cut from (at most `max_bytes` more). Thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.pooled_bytes = 0
        #: A pool nobody takes from (callers hand over their own tensors) keeps nothing.
        self._drawn_from = False
        self._free: defaultdict[Shape, list[torch.Tensor]] = defaultdict(list)
        self._lock = threading.Lock()
        self._slabs = ByteSlabs(self._draw_any, self._give_back, max_bytes)

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous CPU tensor of `shape`, reused when one is free. Flat
        bytes (`(n,)`, uint8: an encoded chunk) are cut from a free buffer of any shape."""
        if dtype == torch.uint8 and len(shape) == 1:
            return self._slabs.take(shape[0])
        with self._lock:
            self._drawn_from = True
            free = self._free.get((shape, dtype))
            if free:
                kv = free.pop()
                self.pooled_bytes -= kv.nbytes
                return kv
        return torch.empty(shape, dtype=dtype)

    def _draw_any(self, nbytes: int) -> torch.Tensor | None:
        """A free buffer of at least `nbytes`, of any shape (for a slab)."""
        with self._lock:
            self._drawn_from = True
            for free in self._free.values():
                if free and free[-1].nbytes >= nbytes:
                    kv = free.pop()
                    self.pooled_bytes -= kv.nbytes
                    return kv
        return None

    def _give_back(self, kv: torch.Tensor) -> None:
        """A slab nobody sees any more: free again, if it fits the budget."""
        with self._lock:
            if self.pooled_bytes + kv.nbytes <= self.max_bytes:
                self._free[(tuple(kv.shape), kv.dtype)].append(kv)
                self.pooled_bytes += kv.nbytes

    def prefill(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """Fill the pool with buffers of `shape` whose memory is already touched, so that the
        first chunks a new process builds (loads from the store, saves) do not pay the
        kernel's first-touch page faults; returns how many were added."""
        nbytes = math.prod(shape) * dtype.itemsize
        added = 0
        while nbytes > 0 and self.pooled_bytes + nbytes <= self.max_bytes:
            kv = torch.zeros(shape, dtype=dtype)
            with self._lock:
                self._drawn_from = True
                self._free[(shape, dtype)].append(kv)
                self.pooled_bytes += nbytes
            added += 1
        return added

    def recycle(self, chunk: Chunk) -> bool:
        """Keep the buffer of a chunk just removed from the cache, if nobody else holds it
        and buffers are being taken from this pool."""
        kv = chunk.kv
        if not _REFCOUNTS_AS_ASSUMED or not self._drawn_from or kv is None:
            return False
        if sys.getrefcount(chunk) > _OWNER_CHUNK_REFS:
            return False
        if chunk.borrowed:
            return False  # memory torch does not own (a received message): never written
        if sys.getrefcount(kv) > _OWNER_TENSOR_REFS or viewed_elsewhere(kv):
            return False
        with self._lock:
            if self.pooled_bytes + kv.nbytes > self.max_bytes:
                return False
            self._free[(tuple(kv.shape), kv.dtype)].append(kv)
            self.pooled_bytes += kv.nbytes
        return True
