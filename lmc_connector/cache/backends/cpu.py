"""LocalCPUBackend: chunks held in CPU memory, LRU within a byte budget."""

from __future__ import annotations

import torch

from lmc_connector.cache.backends.lru import IndexedTier
from lmc_connector.cache.chunk import Chunk
from lmc_connector.cache.pool import BufferPool

#: Removed chunks' buffers kept for reuse: a share of the capacity, at most a fixed amount.
#: In steady state every put evicts one chunk, so a few buffers are enough.
POOL_SHARE = 4
POOL_MAX_BYTES = 256 * 2**20


class LocalCPUBackend(IndexedTier[Chunk]):
    """Chunk objects in memory; capacity counts their real bytes (encoded size when encoded)."""

    name = "LocalCPUBackend"

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__(capacity_bytes, lambda c: c.nbytes)
        self._pool = BufferPool(min(capacity_bytes // POOL_SHARE, POOL_MAX_BYTES))

    def buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A CPU tensor to copy a new chunk into, reusing a removed chunk's memory if it can."""
        return self._pool.take(shape, dtype)

    def write(self, key: int, chunk: Chunk) -> None:
        old = self._index.pop(key)
        self._index.set(key, chunk)
        if old is not None:
            self._pool.recycle(old)

    def remove(self, key: int) -> bool:
        old = self._index.pop(key)
        if old is None:
            return False
        self._pool.recycle(old)
        return True

    def size_of(self, chunk: Chunk) -> int:
        return chunk.nbytes
