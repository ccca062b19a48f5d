"""The disk index and the files on disk agree, also when operations overlap."""

from pathlib import Path

import pytest

from lmc_connector.cache import CacheEngine, Chunk
from lmc_connector.cache.tiers import LocalDiskBackend
from lmc_connector.cache.tiers import disk as disk_module
from lmc_connector.cache.tiers.diskfile import DiskRecord
from lmc_connector.tokens import ChunkKey
from tests.cache.conftest import CHUNK, EngineFactory, RecordingSink, put_prompt, run_in_threads

DISK = "LocalDiskBackend"
PROMPTS = [[p * 100 + i for i in range(CHUNK)] for p in range(4)]


def disk_of(engine: CacheEngine) -> LocalDiskBackend:
    disk = engine.tier(DISK)
    assert isinstance(disk, LocalDiskBackend)
    return disk


def verify_index_matches_files(engine: CacheEngine) -> None:
    disk = disk_of(engine)
    files = {int(p.stem, 16): p.stat().st_size for p in disk.root.glob("*.kvc")}
    with engine.lock:
        indexed = {key: disk.peek(key) for key in disk.chunk_keys()}
    assert set(files) == set(indexed)
    assert all(record is not None and files[k] == record.nbytes for k, record in indexed.items())
    assert disk.usage().used_bytes == sum(files.values())
    assert not list(disk.root.glob(".*.tmp"))


def test_compressing_on_a_full_disk_tier_evicts_nothing(make_engine: EngineFactory) -> None:
    engine = make_engine(local_cpu=False, disk_chunks=4)
    for p in PROMPTS:
        put_prompt(engine, p)
    sink = RecordingSink()
    engine.subscribe(sink)
    assert engine.compress(PROMPTS[3], "fp8", DISK) == CHUNK
    assert [e for e in sink.events if e[0] == "evict"] == []
    assert [engine.lookup(p) for p in PROMPTS] == [CHUNK] * 4
    verify_index_matches_files(engine)


def test_decompress_without_room_leaves_file_and_index_as_they_were(
    make_engine: EngineFactory,
) -> None:
    # Room for two plain chunks and an fp8 one, not three plain ones.
    engine = make_engine(local_cpu=False, disk_chunks=2.95)
    for p in PROMPTS[:2]:
        put_prompt(engine, p)
    engine.compress(PROMPTS[0], "fp8", DISK)
    put_prompt(engine, PROMPTS[2])
    for p in PROMPTS[1:3]:
        engine.pin(p)
    job = engine.run(engine.schedule("decompress", PROMPTS[0], "fp8", DISK))
    assert job.outcome.errors and "no room" in job.outcome.errors[0]
    assert disk_of(engine).peek(engine.hashes(PROMPTS[0])[0]).method == "fp8"  # type: ignore[union-attr]
    verify_index_matches_files(engine)


def test_chunk_removed_while_it_spills_to_disk_stays_removed(
    make_engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fake: the agent thread's remove is injected into the slow file write, because the
    # race window cannot be hit on purpose with real threads.
    engine = make_engine(cpu_chunks=1, disk_chunks=4)
    put_prompt(engine, PROMPTS[0])
    real_write = disk_module.write_chunk

    def write_while_removed(path: Path, key: ChunkKey, chunk: Chunk) -> DiskRecord:
        written = real_write(path, key, chunk)
        engine.remove(PROMPTS[0])
        return written

    monkeypatch.setattr(disk_module, "write_chunk", write_while_removed)
    put_prompt(engine, PROMPTS[1])  # evicts PROMPTS[0] from CPU: it spills
    monkeypatch.undo()
    assert engine.lookup(PROMPTS[0]) == 0
    verify_index_matches_files(engine)


def test_concurrent_spills_and_clears_keep_index_and_files_in_step(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(cpu_chunks=2, disk_chunks=6)

    def churn(seed: int) -> None:
        for i in range(60):
            put_prompt(engine, [seed * 10_000 + (i % 12) * 10 + j for j in range(CHUNK)])
            if i % 20 == 19:
                engine.clear()

    assert not run_in_threads(churn, 3)
    verify_index_matches_files(engine)
