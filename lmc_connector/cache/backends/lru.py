"""Least-recently-used bookkeeping shared by the tiers (mechanism, no I/O)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

V = TypeVar("V")


class LRUIndex(Generic[V]):
    """Key -> value in recency order, with the byte size of each value.

    Not thread-safe: the engine holds its lock around every call.
    """

    def __init__(self, capacity_bytes: int, size_of: Callable[[V], int]) -> None:
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._size_of = size_of
        self._items: OrderedDict[int, V] = OrderedDict()

    def __contains__(self, key: int) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[int]:
        return iter(list(self._items))

    def peek(self, key: int) -> V | None:
        return self._items.get(key)

    def touch(self, key: int) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def set(self, key: int, value: V) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self.used_bytes -= self._size_of(old)
        self._items[key] = value
        self.used_bytes += self._size_of(value)

    def pop(self, key: int) -> V | None:
        value = self._items.pop(key, None)
        if value is not None:
            self.used_bytes -= self._size_of(value)
        return value

    def victims(self, need_bytes: int, is_pinned: Callable[[int], bool]) -> list[int] | None:
        """Least recently used unpinned keys whose removal frees room for `need_bytes`.

        None when even evicting every unpinned entry would not make room.
        """
        if need_bytes > self.capacity_bytes:
            return None
        shortfall = self.used_bytes + need_bytes - self.capacity_bytes
        chosen: list[int] = []
        for key, value in self._items.items():
            if shortfall <= 0:
                break
            if is_pinned(key):
                continue
            chosen.append(key)
            shortfall -= self._size_of(value)
        return chosen if shortfall <= 0 else None


class IndexedTier(Generic[V]):
    """What every tier answers from its LRU index alone; tiers add read/write/remove."""

    def __init__(self, capacity_bytes: int, size_of: Callable[[V], int]) -> None:
        self._index: LRUIndex[V] = LRUIndex(capacity_bytes, size_of)

    @property
    def used_bytes(self) -> int:
        return self._index.used_bytes

    @property
    def capacity_bytes(self) -> int:
        return self._index.capacity_bytes

    def __contains__(self, key: int) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> Iterator[int]:
        return iter(self._index)

    def peek(self, key: int) -> V | None:
        return self._index.peek(key)

    def touch(self, key: int) -> V | None:
        """The entry under `key`, now the most recently used."""
        return self._index.touch(key)

    def victims(self, need_bytes: int, is_pinned: Callable[[int], bool]) -> list[int] | None:
        return self._index.victims(need_bytes, is_pinned)
