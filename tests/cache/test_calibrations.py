"""Calibrations in a worker's cache: fitted on cached chunks, kept beside the tiers, found
again after a restart; a chunk whose calibration is nowhere is a miss, never wrong KV."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmc_connector.cache import CacheEngine
from lmc_connector.cache.errors import NotCalibratedError, NotEnoughKVError
from lmc_connector.cache.tiers.disk import CALIBRATIONS
from tests.cache.conftest import CHUNK, LAYOUT, EngineFactory, make_kv, put_prompt

CPU, DISK = "LocalCPUBackend", "LocalDiskBackend"
#: 40 tokens, 10 chunks: more than the 16 (2 planes x 8 channels) a calibration needs.
PROMPT = list(range(1000, 1040))
ROOMY = {"cpu_chunks": 32}


def calibrate(engine: CacheEngine) -> str:
    job = engine.calibrate(engine.schedule_calibration("kvtc"))
    assert job.outcome.calibration_id is not None
    return job.outcome.calibration_id


def originals(tokens: list[int] = PROMPT) -> list[torch.Tensor]:
    """What put_prompt(engine, tokens) stored, chunk by chunk."""
    return [make_kv(min(CHUNK, len(tokens) - i), i // CHUNK) for i in range(0, len(tokens), CHUNK)]


def close_to(got: list[torch.Tensor], want: list[torch.Tensor]) -> bool:
    """Every chunk within kvtc's error of the original (relative L2 well under 0.2)."""
    return len(got) == len(want) and all(
        float((g.float() - w.float()).norm() / w.float().norm()) < 0.2
        for g, w in zip(got, want, strict=True)
    )


def test_compress_with_kvtc_before_calibrating_names_the_route_and_the_command(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(**ROOMY)
    keys = put_prompt(engine, PROMPT)
    with pytest.raises(NotCalibratedError, match=r"POST /calibrate.*lmc-admin calibrate"):
        engine.schedule("compress", PROMPT, "kvtc", CPU)
    assert not any(engine.is_pinned(k) for k in keys)


def test_calibrating_on_too_little_cached_kv_says_how_much_is_needed(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(**ROOMY)
    put_prompt(engine, PROMPT[:8])
    with pytest.raises(NotEnoughKVError, match=r"at least 16 cached tokens.*holds 8"):
        engine.schedule_calibration("kvtc")


def test_a_codec_that_takes_no_calibration_is_refused_naming_those_that_do(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(**ROOMY)
    with pytest.raises(ValueError, match=r"fp8 takes no calibration; methods that do: kvtc"):
        engine.schedule_calibration("fp8")


def test_samples_are_pinned_until_the_fit_ran_and_the_outcome_counts_them(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(**ROOMY)
    keys = put_prompt(engine, PROMPT)
    job = engine.schedule_calibration("kvtc")
    assert job.outcome.num_tokens == len(PROMPT)
    assert all(engine.is_pinned(k) for k in keys)
    engine.calibrate(job)
    assert not any(engine.is_pinned(k) for k in keys)
    outcome = job.outcome
    assert (outcome.chunks_done, outcome.num_tokens) == (10, len(PROMPT))
    assert outcome.bytes_before == len(PROMPT) * 2 * 2 * 8 * 2  # the samples' float16 KV
    assert outcome.bytes_after > 0
    assert engine.calibrations.current_ids() == {"kvtc": outcome.calibration_id}


def test_kvtc_chunks_decode_after_calibration_and_after_a_restart_over_the_same_disk(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    first = make_engine(cpu_chunks=32, disk_chunks=32)
    keys = put_prompt(first, PROMPT)
    calibration = calibrate(first)
    assert first.move(PROMPT, CPU, DISK) == len(PROMPT)
    assert first.compress(PROMPT, "kvtc", DISK) == len(PROMPT)
    served = first.get(keys)
    assert close_to(served, originals())
    first.close()
    shelf = tmp_path / "disk" / LAYOUT.fingerprint() / CALIBRATIONS
    assert (shelf / f"{calibration}.cal").is_file()
    assert (shelf / "kvtc.current").read_text() == calibration

    again = make_engine(cpu_chunks=32, disk_chunks=32)
    assert again.calibrations.current_ids() == {"kvtc": calibration}
    reloaded = again.get(keys)
    assert len(reloaded) == len(keys)
    assert all(torch.equal(a, b) for a, b in zip(reloaded, served, strict=True))


def test_a_chunk_whose_calibration_is_nowhere_is_a_miss_and_its_copy_makes_way(
    make_engine: EngineFactory,
) -> None:
    holder = make_engine(**ROOMY)
    keys = put_prompt(holder, PROMPT)
    calibrate(holder)
    holder.compress(PROMPT, "kvtc", CPU)
    stranger = make_engine(**ROOMY)  # no disk, no shared store: cannot find the calibration
    for key, chunk in zip(keys, holder.stored(keys), strict=True):
        assert chunk.method == "kvtc" and stranger.admit(key, chunk)
    assert stranger.get(keys) == []
    assert stranger.tier(CPU).held(keys) == [False] + [True] * (len(keys) - 1)
    assert stranger.put(keys[0], make_kv(CHUNK, 0))  # recomputed KV takes the first place
    assert len(stranger.get(keys)) == 1


def test_a_damaged_calibration_file_is_never_used(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    first = make_engine(cpu_chunks=32, disk_chunks=32)
    keys = put_prompt(first, PROMPT)
    calibration = calibrate(first)
    first.move(PROMPT, CPU, DISK)
    first.compress(PROMPT, "kvtc", DISK)
    first.close()
    path = tmp_path / "disk" / LAYOUT.fingerprint() / CALIBRATIONS / f"{calibration}.cal"
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    path.write_bytes(bytes(damaged))

    again = make_engine(cpu_chunks=32, disk_chunks=32)
    assert again.calibrations.current_ids() == {}
    assert again.get(keys) == []
