import dataclasses
from pathlib import Path

import torch

from tests.cache.conftest import CHUNK, LAYOUT, EngineFactory, RecordingSink, make_kv, put_prompt

DISK = "LocalDiskBackend"


def chunk_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "disk").rglob("*.kvc"))


def test_chunks_evicted_from_cpu_spill_to_disk_and_are_still_found(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(cpu_chunks=1, disk_chunks=4)
    first = put_prompt(engine, [1, 2, 3, 4])
    put_prompt(engine, [5, 6, 7, 8])
    assert engine.lookup([1, 2, 3, 4], locations=["LocalCPUBackend"]) == 0
    assert engine.lookup([1, 2, 3, 4], locations=[DISK]) == CHUNK
    assert torch.equal(engine.get(first)[0], make_kv(CHUNK, 0))


def test_restarted_engine_readmits_its_disk_chunks(make_engine: EngineFactory) -> None:
    engine = make_engine(local_cpu=False, disk_chunks=4)
    keys = put_prompt(engine, list(range(10)))
    restarted = make_engine(local_cpu=False, disk_chunks=4)
    sink = RecordingSink()
    assert restarted.lookup(list(range(10))) == 10
    got = restarted.get(keys)
    assert [g.shape[2] for g in got] == [CHUNK, CHUNK, 2]
    assert torch.equal(got[2], make_kv(2, 2))
    restarted.subscribe(sink)


def test_corrupted_disk_file_is_dropped_and_never_returned(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    engine = make_engine(local_cpu=False, disk_chunks=4)
    keys = put_prompt(engine, [1, 2, 3, 4])
    path = chunk_files(tmp_path)[0]
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    sink = RecordingSink()
    engine.subscribe(sink)
    assert engine.get(keys) == []
    assert ("evict", DISK, keys[0]) in sink.events
    assert not path.exists()
    assert engine.lookup([1, 2, 3, 4]) == 0


def test_truncated_file_is_not_readmitted_after_restart(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    engine = make_engine(local_cpu=False, disk_chunks=4)
    put_prompt(engine, [1, 2, 3, 4])
    path = chunk_files(tmp_path)[0]
    path.write_bytes(path.read_bytes()[:-10])
    restarted = make_engine(local_cpu=False, disk_chunks=4)
    assert restarted.lookup([1, 2, 3, 4]) == 0


def test_disk_tier_of_another_layout_is_invisible(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    engine = make_engine(local_cpu=False, disk_chunks=4)
    put_prompt(engine, [1, 2, 3, 4])
    other_model = dataclasses.replace(LAYOUT, model="another-model")
    other = make_engine(local_cpu=False, disk_chunks=4, layout=other_model)
    assert other.lookup([1, 2, 3, 4]) == 0


def test_move_between_tiers_keeps_the_data(make_engine: EngineFactory) -> None:
    engine = make_engine(disk_chunks=4)
    keys = put_prompt(engine, list(range(10)))
    assert engine.move(list(range(10)), "LocalCPUBackend", DISK) == 10
    assert engine.lookup(list(range(10)), locations=["LocalCPUBackend"]) == 0
    assert engine.move(list(range(10)), DISK, "LocalCPUBackend") == 10
    assert engine.lookup(list(range(10)), locations=[DISK]) == 0
    assert torch.equal(engine.get(keys)[1], make_kv(CHUNK, 1))


def test_interrupted_write_leaves_no_partial_chunk(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    engine = make_engine(local_cpu=False, disk_chunks=4)
    put_prompt(engine, [1, 2, 3, 4])
    folder = chunk_files(tmp_path)[0].parent
    (folder / ".00000000000000aa.kvc.dead.tmp").write_bytes(b"half a chunk")
    restarted = make_engine(local_cpu=False, disk_chunks=4)
    assert restarted.lookup([1, 2, 3, 4]) == CHUNK
    assert not list(folder.glob(".*.tmp"))
