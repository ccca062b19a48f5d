"""What the cache tells observers: load/save counters per tier, where a hit lives, and a
reset that leaves nothing behind (pinned chunks included)."""

from __future__ import annotations

from pathlib import Path

from lmc_connector.cache.stats import TierCounts
from tests.cache.conftest import (
    CHUNK,
    CHUNK_BYTES,
    EngineFactory,
    RecordingSink,
    make_kv,
    put_prompt,
)

CPU, DISK = "LocalCPUBackend", "LocalDiskBackend"
A = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]  # two full chunks and a partial one of 2 tokens
B = [50, 51, 52, 53]


def test_saves_and_loads_are_counted_per_tier_in_tokens_and_stored_bytes(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(cpu_chunks=3, disk_chunks=8)
    keys = put_prompt(engine, A)  # 3 chunks into CPU
    put_prompt(engine, B)  # evicts A's first chunk: it spills to disk
    saved = engine.ctx.stats.take()
    partial_bytes = CHUNK_BYTES // CHUNK * 2
    assert saved[CPU] == TierCounts(
        save_tokens=len(A) + len(B), save_bytes=3 * CHUNK_BYTES + partial_bytes
    )
    assert saved[DISK] == TierCounts(save_tokens=CHUNK, save_bytes=CHUNK_BYTES)

    engine.remove(B)  # room for chunk 0 to come back into memory
    assert len(engine.get(keys)) == 3  # chunk 0 from disk, the others from memory
    loaded = engine.ctx.stats.take()
    assert loaded[DISK] == TierCounts(load_tokens=CHUNK, load_bytes=CHUNK_BYTES)
    assert loaded[CPU] == TierCounts(load_tokens=CHUNK + 2, load_bytes=CHUNK_BYTES + partial_bytes)
    assert engine.ctx.stats.take() == {}  # taken means reset


def test_a_compressed_chunk_counts_its_stored_size(make_engine: EngineFactory) -> None:
    engine = make_engine()
    keys = put_prompt(engine, B)
    engine.compress(B, "fp8", CPU)
    engine.ctx.stats.take()
    engine.get(keys)
    loaded = engine.ctx.stats.take()[CPU]
    assert loaded.load_tokens == CHUNK
    assert 0 < loaded.load_bytes < CHUNK_BYTES


def test_locate_names_the_nearest_tier_of_each_hit_chunk(make_engine: EngineFactory) -> None:
    engine = make_engine(cpu_chunks=3, disk_chunks=8)
    keys = put_prompt(engine, A)
    put_prompt(engine, B)  # A's first chunk now only on disk
    found = engine.locate(keys, len(A))
    tokens, tiers = found.tokens, found.tiers
    assert tokens == len(A)
    assert [t.name for t in tiers] == [DISK, CPU, CPU]
    assert [t.hit_source for t in tiers] == ["disk", "host", "host"]
    assert [t.event_medium for t in tiers] == ["STORAGE", "CPU", "CPU"]


def test_reset_removes_every_chunk_of_every_own_tier_pinned_ones_too(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    engine = make_engine(cpu_chunks=3, disk_chunks=8)
    keys = put_prompt(engine, A)
    put_prompt(engine, B)
    sink = RecordingSink()
    engine.subscribe(sink)
    # A load in flight: the scheduler's lookup pinned A's chunks.
    assert engine.lookup_keys(keys, len(A), pin=True) == len(A)
    assert engine.reset() == 3 + 1  # A's last two chunks and B in memory, A's first on disk
    assert engine.lookup(A) == 0 and engine.lookup(B) == 0
    assert {u.chunks for u in engine.usage().values()} == {0}
    assert not list((tmp_path / "disk").rglob("*.kvc"))
    # Everything removed was reported (the controller's index and KV events follow).
    evicted = {(where, k) for what, where, k in sink.events if what == "evict"}
    b = engine.hashes(B)[0]
    assert evicted == {(CPU, keys[1]), (CPU, keys[2]), (CPU, b), (DISK, keys[0])}
    # The planned load now finds nothing: vLLM recomputes those tokens.
    assert engine.get(keys) == []
    # Pins stay with their holder: a chunk stored again is pinned until the load releases it.
    assert engine.put(keys[0], make_kv())
    assert engine.is_pinned(keys[0])
    engine.unpin_keys(keys)
    assert not engine.is_pinned(keys[0])
