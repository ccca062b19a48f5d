"""What the local tiers share: an in-memory LRU index within a byte budget, and eviction."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar

from typing_extensions import override

from lmc_connector.cache.chunk import Chunk, ChunkForm
from lmc_connector.cache.tiers.base import Marker, Tier, TierContext, TierUsage
from lmc_connector.cache.tiers.lru import LRUIndex
from lmc_connector.tokens import ChunkKey


class IndexEntry(Protocol):
    """What an index entry tells about its chunk without reading it."""

    @property
    def num_tokens(self) -> int: ...

    @property
    def method(self) -> str | None: ...


E = TypeVar("E", bound=IndexEntry)
#: Chunks removed per lock acquisition when a whole tier is cleared, so that lookups and
#: loads go on between batches.
CLEAR_BATCH = 256


class IndexedTier(Tier, Generic[E]):
    """A tier that knows every chunk it holds from an in-memory index of entries `E`.

    The index (recency order, byte accounting) is only touched under the
    cache lock. Subclasses say how big a chunk is here (`size_of`) and what
    evicting an entry involves (`_evict`, also under the lock).
    """

    def __init__(self, ctx: TierContext, capacity_bytes: int, size: Callable[[E], int]) -> None:
        super().__init__(ctx)
        self._index: LRUIndex[E] = LRUIndex(capacity_bytes, size)

    @abstractmethod
    def size_of(self, chunk: Chunk) -> int:
        """Bytes `chunk` would take in this tier."""

    @abstractmethod
    def _drop(self, key: ChunkKey) -> bool:
        """Forget `key` and free what it used (lock held); False if it was not here."""

    def _evict(self, key: ChunkKey) -> None:
        """Drop `key` to make room (lock held); the caller emits the event."""
        self._drop(key)

    @property
    def capacity_bytes(self) -> int:
        return self._index.capacity_bytes

    def peek(self, key: ChunkKey) -> E | None:
        """The index entry of `key` (call with the lock held)."""
        return self._index.peek(key)

    @override
    def held(self, keys: Sequence[ChunkKey]) -> list[bool]:
        with self.ctx.lock:
            return [key in self._index for key in keys]

    @override
    def touch(self, key: ChunkKey) -> bool:
        with self.ctx.lock:
            return self._index.touch(key) is not None

    @override
    def forms(self, keys: Sequence[ChunkKey]) -> list[ChunkForm | None]:
        with self.ctx.lock:
            entries = [self._index.peek(key) for key in keys]
        return [None if e is None else ChunkForm(e.num_tokens, e.method) for e in entries]

    @override
    def chunk_keys(self) -> list[ChunkKey]:
        with self.ctx.lock:
            return list(self._index)

    @override
    def usage(self) -> TierUsage:
        with self.ctx.lock:
            return TierUsage(len(self._index), self._index.used_bytes, self.capacity_bytes)

    @override
    def remove(self, keys: Sequence[ChunkKey]) -> int:
        with self.ctx.lock:
            gone = [key for key in keys if self._drop(key)]
            self.ctx.evicted(self.name, gone)
        return len(gone)

    @override
    def remove_seen(self, key: ChunkKey, marker: Marker) -> bool:
        with self.ctx.lock:
            if self._index.peek(key) is not marker or not self._drop(key):
                return False
            self.ctx.evicted(self.name, [key])
        return True

    @override
    def clear(self) -> tuple[int, int]:
        with self.ctx.lock:
            keys = list(self._index)
        removed = kept = 0
        for start in range(0, len(keys), CLEAR_BATCH):
            with self.ctx.lock:
                batch = keys[start : start + CLEAR_BATCH]
                kept += sum(self.ctx.is_pinned(key) for key in batch)
                gone = [key for key in batch if not self.ctx.is_pinned(key) and self._drop(key)]
                self.ctx.evicted(self.name, gone)
            removed += len(gone)
        return removed, kept

    def _make_room(self, need: int, exclude: ChunkKey | None = None) -> bool:
        """Evict unpinned chunks, least recently used first, until `need` more bytes fit.

        Lock held. Evicts nothing and returns False when even every unpinned
        chunk would not make room.
        """
        pins = self.ctx.pins
        victims = self._index.victims(need, lambda k: k == exclude or k in pins)
        if victims is None:
            return False
        for key in victims:
            self._evict(key)
        self.ctx.evicted(self.name, victims)
        return True

    def _no_room(self, nbytes: int) -> None:
        self.ctx.warn_no_room(self.name, nbytes, self.capacity_bytes)
