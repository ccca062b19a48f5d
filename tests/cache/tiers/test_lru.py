"""LRUIndex: keys in recency order with a running byte total."""

from __future__ import annotations

from lmc_connector.cache.tiers.lru import LRUIndex
from lmc_connector.tokens import ChunkKey


def test_pop_oldest_removes_the_least_recent_keys_and_their_bytes() -> None:
    index: LRUIndex[int] = LRUIndex(0, int)
    for key, nbytes in ((1, 10), (2, 20), (3, 30)):
        index.set(ChunkKey(key), nbytes)
    index.touch(ChunkKey(1))
    assert index.pop_oldest(2) == [ChunkKey(2), ChunkKey(3)]
    assert list(index) == [ChunkKey(1)] and index.used_bytes == 10
    assert index.pop_oldest(5) == [ChunkKey(1)]
    assert len(index) == 0 and index.used_bytes == 0
