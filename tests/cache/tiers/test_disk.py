import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmc_connector.cache.tiers import LocalDiskBackend
from lmc_connector.cache.tiers.disk import HOST_TAG
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
    left_over = folder / ".00000000000000aa.kvc.dead.tmp"
    left_over.write_bytes(b"half a chunk")
    an_hour_ago = time.time() - 3600
    os.utime(left_over, (an_hour_ago, an_hour_ago))
    restarted = make_engine(local_cpu=False, disk_chunks=4)
    assert restarted.lookup([1, 2, 3, 4]) == CHUNK
    assert not left_over.exists()


def test_another_writers_fresh_temporary_file_is_left_alone(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    engine = make_engine(local_cpu=False, disk_chunks=4)
    put_prompt(engine, [1, 2, 3, 4])
    in_flight = chunk_files(tmp_path)[0].parent / ".00000000000000bb.kvc.busy.tmp"
    in_flight.write_bytes(b"being written")
    make_engine(local_cpu=False, disk_chunks=4)
    assert in_flight.exists()


def test_a_live_writers_temporary_file_survives_another_processs_start(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """Data-parallel ranks share the folder: a rank starting never deletes a file another
    rank is writing, however long that write takes; a dead writer's file goes."""
    engine = make_engine(local_cpu=False, disk_chunks=4)
    put_prompt(engine, [1, 2, 3, 4])
    folder = chunk_files(tmp_path)[0].parent
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = folder / f".00000000000000cc.kvc.{HOST_TAG}-{writer.pid}-abc.tmp"
        live.write_bytes(b"a slow write")
        an_hour_ago = time.time() - 3600
        os.utime(live, (an_hour_ago, an_hour_ago))
        make_engine(local_cpu=False, disk_chunks=4)
        assert live.exists()
    finally:
        writer.kill()
        writer.wait()
    make_engine(local_cpu=False, disk_chunks=4)
    assert not live.exists()


def test_file_removed_by_another_process_is_a_miss_not_an_error(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    engine = make_engine(local_cpu=False, disk_chunks=4)
    keys = put_prompt(engine, [1, 2, 3, 4])
    chunk_files(tmp_path)[0].unlink()
    assert engine.get(keys) == []
    assert engine.lookup([1, 2, 3, 4]) == 0


def test_put_into_a_failing_disk_tier_is_a_miss_not_an_error(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    engine = make_engine(local_cpu=False, disk_chunks=4)
    put_prompt(engine, [1, 2, 3, 4])
    key = engine.hashes([5, 6, 7, 8])[0]
    disk = engine.tier(DISK)
    assert isinstance(disk, LocalDiskBackend)
    disk.path(key).mkdir()  # the chunk's file name is taken: its write fails for real
    assert not engine.put(key, make_kv())
    assert engine.lookup([1, 2, 3, 4]) == CHUNK


def test_put_of_a_chunk_whose_file_is_corrupt_does_not_raise(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    engine = make_engine(local_cpu=False, disk_chunks=4)
    keys = put_prompt(engine, [1, 2, 3, 4])
    path = chunk_files(tmp_path)[0]
    path.write_bytes(path.read_bytes()[:-1] + b"x")
    assert engine.put(keys[0], make_kv())


def test_a_valid_file_under_another_chunks_name_is_a_miss_never_served(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    engine = make_engine(local_cpu=False, disk_chunks=4)
    (a,) = put_prompt(engine, [1, 2, 3, 4], seed=0)
    (b,) = put_prompt(engine, [5, 6, 7, 8], seed=1)
    disk = engine.tier(DISK)
    assert isinstance(disk, LocalDiskBackend)
    disk.path(b).write_bytes(disk.path(a).read_bytes())  # a planted copy: valid, wrong key
    assert engine.get([b]) == []
    assert engine.lookup([5, 6, 7, 8]) == 0
    assert torch.equal(engine.get([a])[0], make_kv(CHUNK, 0))


def test_a_file_found_at_restart_is_reported_cached_only_once_verified(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    engine = make_engine(local_cpu=False, disk_chunks=4)
    keys = put_prompt(engine, [1, 2, 3, 4, 5, 6, 7, 8])
    files = {p.stem: p for p in chunk_files(tmp_path)}
    corrupt = files[f"{keys[1]:016x}"]
    data = bytearray(corrupt.read_bytes())
    data[-3] ^= 0xFF  # same size, valid header: only the checksum can tell
    corrupt.write_bytes(bytes(data))
    renamed = files[f"{keys[0]:016x}"]
    renamed.rename(renamed.with_name(f"{0xABCDEF:016x}.kvc"))  # a valid file, another name
    restarted = make_engine(local_cpu=False, disk_chunks=4)
    assert restarted.tier(DISK).chunk_keys() == []
    assert chunk_files(tmp_path) == []


def test_a_folder_larger_than_the_tier_is_trimmed_to_it_oldest_first_at_start(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(local_cpu=False, disk_chunks=4)
    old = put_prompt(engine, list(range(8)))  # two chunks
    time.sleep(0.05)  # file times order the re-admission
    new = put_prompt(engine, list(range(100, 108)), seed=5)
    restarted = make_engine(local_cpu=False, disk_chunks=2)
    usage = restarted.tier(DISK).usage()
    assert 0 < usage.used_bytes <= usage.capacity_bytes
    assert restarted.lookup(list(range(100, 108))) == 8
    assert restarted.lookup(list(range(8))) == 0
    assert len(old) == len(new) == 2


def test_a_file_that_cannot_be_read_for_now_is_a_miss_and_stays(
    make_engine: EngineFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmc_connector.cache.tiers import disk

    engine = make_engine(local_cpu=False, disk_chunks=4)
    keys = put_prompt(engine, list(range(4)))

    def no_descriptors(*args: object) -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(disk, "read_chunk", no_descriptors)
    assert engine.get(keys) == []
    monkeypatch.undo()
    assert len(chunk_files(tmp_path)) == 1
    restarted = make_engine(local_cpu=False, disk_chunks=4)
    assert torch.equal(restarted.get(keys)[0], make_kv(CHUNK, 0))
