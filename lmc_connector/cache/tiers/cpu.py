"""LocalCPUBackend: chunks held in CPU memory, LRU within a byte budget."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from typing_extensions import override

from lmc_connector.cache.chunk import Chunk
from lmc_connector.cache.pool import BufferPool
from lmc_connector.cache.tiers.base import Marker, Tier, TierContext
from lmc_connector.cache.tiers.indexed import IndexedTier
from lmc_connector.ops.codecs.errors import MissingCalibrationError
from lmc_connector.tokens import ChunkKey

#: Chunks encoded per round when the tier makes room by compressing (`compress_before_evict`).
SQUEEZE_BATCH = 8
#: Turns plain chunks into encoded ones (the engine's codec on its codec device).
Compressor = Callable[[list[Chunk]], list[Chunk]]

#: Free buffers kept for reuse: a share of the capacity, at most a fixed amount. A new
#: worker touches them all at start-up, so that the chunks of its first few long prompts
#: (loaded from a shared store, plain or encoded, or computed and saved) land in warm
#: memory; in steady state every put evicts one chunk, and its buffer serves the next.
POOL_SHARE = 4
POOL_MAX_BYTES = 2**30

logger = logging.getLogger(__name__)


class LocalCPUBackend(IndexedTier[Chunk]):
    """Chunk objects in memory; capacity counts their real bytes (encoded size when encoded).

    Owns the index of its chunks, a pool of removed chunks' buffers, and the
    queue of evicted chunks waiting to be written to `spill_to` (the disk
    tier). Chunks are queued under the lock and written by `flush`, which the
    engine calls without it. With a `compressor`, a store that does not fit
    first compresses the least recently used plain chunks (in the storing
    thread, outside the lock), and evicts only what compression could not free.
    """

    name = "LocalCPUBackend"
    hit_source = "host"
    event_medium = "CPU"

    def __init__(self, ctx: TierContext, capacity_bytes: int) -> None:
        super().__init__(ctx, capacity_bytes, lambda c: c.nbytes)
        self._pool = BufferPool(min(capacity_bytes // POOL_SHARE, POOL_MAX_BYTES))
        #: Where evicted chunks go instead of being dropped (the next local tier), if anywhere.
        self.spill_to: Tier | None = None
        self._spills: list[tuple[ChunkKey, Chunk, Callable[[], bool]]] = []
        #: Compresses chunks instead of evicting them (`compress_before_evict`), if set.
        self.compressor: Compressor | None = None
        #: Chunks compressed to make room so far.
        self.squeezed = 0

    def buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A CPU tensor to copy a new chunk into, reusing a removed chunk's memory if it can."""
        return self._pool.take(shape, dtype)

    def prefill_buffers(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """Touch the pool's share of memory now, as buffers of `shape` (see BufferPool)."""
        return self._pool.prefill(shape, dtype)

    @override
    def size_of(self, chunk: Chunk) -> int:
        return chunk.nbytes

    @override
    def load(self, key: ChunkKey) -> tuple[Marker, Chunk | None]:
        with self.ctx.lock:
            chunk = self._index.peek(key)
        return chunk, chunk

    @override
    def store(
        self, key: ChunkKey, chunk: Chunk, still_wanted: Callable[[], bool] | None = None
    ) -> bool:
        if self.compressor is not None:
            self._squeeze(key, chunk.nbytes)
        with self.ctx.lock:
            if key in self._index:
                stored = True
            elif still_wanted is not None and not still_wanted():
                stored = False
            elif not self._make_room(chunk.nbytes, exclude=key):
                self._no_room(chunk.nbytes)
                stored = False
            else:
                self._index.set(key, chunk)
                self.ctx.admitted(self.name, [key])
                stored = True
        self.flush()
        return stored

    @override
    def replace(self, key: ChunkKey, marker: Marker, chunk: Chunk) -> bool | None:
        with self.ctx.lock:
            old = self._index.peek(key)
            if old is None or old is not marker:
                return None
            grow = chunk.nbytes - old.nbytes
            if grow > 0 and not self._make_room(grow, exclude=key):
                return False
            self._index.pop(key)
            self._index.set(key, chunk)
            self._pool.recycle(old)
        self.flush()
        return True

    @override
    def flush(self) -> None:
        """Write the chunks eviction queued to `spill_to`, one at a time, without the lock."""
        while True:
            with self.ctx.lock:
                if not self._spills:
                    return
                key, chunk, still_wanted = self._spills.pop()
            spill_to = self.spill_to
            if spill_to is not None and spill_to.store(key, chunk, still_wanted):
                self.ctx.stats.saved(spill_to.name, chunk.num_tokens, chunk.nbytes)
            with self.ctx.lock:
                self.ctx.end_spill(key, still_wanted)

    def _squeeze(self, key: ChunkKey, need: int) -> None:
        """Compress least recently used plain, unpinned chunks until `need` more bytes fit.

        Each round encodes the coldest chunks whose plain size covers what is
        still missing (at most `SQUEEZE_BATCH`), so only as much is compressed
        as the codec's ratio requires.
        """
        compressor = self.compressor
        assert compressor is not None
        tried: set[ChunkKey] = set()
        while True:
            with self.ctx.lock:
                index = self._index
                shortfall = index.used_bytes + need - index.capacity_bytes
                if key in index or shortfall <= 0:
                    return
                batch: list[tuple[ChunkKey, Chunk]] = []
                for k, c in index.oldest():
                    if shortfall <= 0 or len(batch) == SQUEEZE_BATCH:
                        break
                    if c.kv is not None and k not in tried and not self.ctx.is_pinned(k):
                        batch.append((k, c))
                        shortfall -= c.nbytes
            if not batch:
                return
            tried.update(k for k, _ in batch)
            try:
                encoded = compressor([c for _, c in batch])
            except MissingCalibrationError:
                return  # not calibrated yet: evict as usual (the compressor said why, once)
            except (ValueError, RuntimeError):
                logger.exception("compress_before_evict failed; evicting instead")
                return
            for (k, old), new in zip(batch, encoded, strict=True):
                if self.replace(k, old, new):
                    self.squeezed += 1

    @override
    def _drop(self, key: ChunkKey) -> bool:
        old = self._index.pop(key)
        if old is None:
            return False
        self._pool.recycle(old)
        return True

    @override
    def _evict(self, key: ChunkKey) -> None:
        spill_to = self.spill_to
        if spill_to is None or spill_to.held([key])[0]:
            self._drop(key)
            return
        chunk = self._index.pop(key)
        if chunk is not None:
            self._spills.append((key, chunk, self.ctx.start_spill(key)))
