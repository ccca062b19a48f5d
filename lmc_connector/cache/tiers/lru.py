"""Least-recently-used bookkeeping, with a running byte total, of what a tier holds (no I/O)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from lmc_connector.tokens import ChunkKey

V = TypeVar("V")


class LRUIndex(Generic[V]):
    """Key -> value in recency order, with the byte size of each value.

    Not thread-safe: its tier holds the cache lock around every call.
    """

    def __init__(self, capacity_bytes: int, size_of: Callable[[V], int]) -> None:
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._size_of = size_of
        self._items: OrderedDict[ChunkKey, V] = OrderedDict()

    def __contains__(self, key: ChunkKey) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[ChunkKey]:
        return iter(list(self._items))

    def oldest(self) -> Iterator[tuple[ChunkKey, V]]:
        """Entries from the least recently used on (a snapshot, safe to change the index)."""
        return iter(list(self._items.items()))

    def peek(self, key: ChunkKey) -> V | None:
        return self._items.get(key)

    def touch(self, key: ChunkKey) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def set(self, key: ChunkKey, value: V) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self.used_bytes -= self._size_of(old)
        self._items[key] = value
        self.used_bytes += self._size_of(value)

    def pop(self, key: ChunkKey) -> V | None:
        value = self._items.pop(key, None)
        if value is not None:
            self.used_bytes -= self._size_of(value)
        return value

    def pop_oldest(self, count: int) -> list[ChunkKey]:
        """Remove the `count` least recently used entries; their keys."""
        keys = []
        for _ in range(min(count, len(self._items))):
            key, value = self._items.popitem(last=False)
            self.used_bytes -= self._size_of(value)
            keys.append(key)
        return keys

    def victims(
        self, need_bytes: int, is_pinned: Callable[[ChunkKey], bool]
    ) -> list[ChunkKey] | None:
        """Least recently used unpinned keys whose removal frees room for `need_bytes`.

        None when even evicting every unpinned entry would not make room.
        """
        if need_bytes > self.capacity_bytes:
            return None
        shortfall = self.used_bytes + need_bytes - self.capacity_bytes
        chosen: list[ChunkKey] = []
        for key, value in self._items.items():
            if shortfall <= 0:
                break
            if is_pinned(key):
                continue
            chosen.append(key)
            shortfall -= self._size_of(value)
        return chosen if shortfall <= 0 else None
