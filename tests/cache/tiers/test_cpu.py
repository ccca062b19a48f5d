"""The CPU tier with `compress_before_evict`: compress the coldest chunks, evict only after."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pytest
import torch

from lmc_connector.cache import CacheEngine
from lmc_connector.cache.tiers import LocalCPUBackend
from lmc_connector.config import ConfigError
from lmc_connector.ops.codecs import fit_calibration
from lmc_connector.tokens import ChunkKey
from tests.cache.conftest import CHUNK, LAYOUT, EngineFactory

CPU = "LocalCPUBackend"
PROMPTS = [[p * 100 + i for i in range(CHUNK)] for p in range(12)]
#: Chunks wide enough that an encoded one is clearly smaller than its plain form.
WIDE = dataclasses.replace(LAYOUT, channels=256)
WIDE_BYTES = 2 * 2 * CHUNK * 256 * 2


def engine_of(make_engine: EngineFactory, chunks: int, **extra: Any) -> CacheEngine:
    return make_engine(layout=WIDE, max_local_cpu_size=chunks * WIDE_BYTES / 1e9, **extra)


def put_prompt(engine: CacheEngine, tokens: list[int]) -> list[ChunkKey]:
    keys = engine.hashes(tokens)
    generator = torch.Generator().manual_seed(tokens[0])
    assert engine.put(keys[0], torch.randn(WIDE.shape(CHUNK), generator=generator).half())
    return keys


def cpu_of(engine: CacheEngine) -> LocalCPUBackend:
    tier = engine.tier(CPU)
    assert isinstance(tier, LocalCPUBackend)
    return tier


def encoded(engine: CacheEngine, tokens: list[int]) -> bool:
    _, chunk = engine.tier(CPU).load(engine.hashes(tokens)[0])
    assert chunk is not None
    return chunk.encoded


def test_a_full_tier_compresses_its_coldest_chunks_instead_of_evicting(
    make_engine: EngineFactory,
) -> None:
    plain_lru = engine_of(make_engine, 4)
    squeezing = engine_of(make_engine, 4, compress_before_evict="fp8")
    for engine in (plain_lru, squeezing):
        for p in PROMPTS[:6]:
            put_prompt(engine, p)
    assert [plain_lru.lookup(p) for p in PROMPTS[:6]] == [0, 0] + [CHUNK] * 4
    assert [squeezing.lookup(p) for p in PROMPTS[:6]] == [CHUNK] * 6
    assert cpu_of(squeezing).squeezed >= 2


def test_recently_used_chunks_stay_plain(make_engine: EngineFactory) -> None:
    engine = engine_of(make_engine, 4, compress_before_evict="fp8")
    for p in PROMPTS[:4]:
        put_prompt(engine, p)
    engine.contains(engine.hashes(PROMPTS[0])[0])  # the oldest becomes the hottest
    put_prompt(engine, PROMPTS[4])
    assert not encoded(engine, PROMPTS[0])
    assert encoded(engine, PROMPTS[1])
    assert not encoded(engine, PROMPTS[4])


def test_pinned_chunks_are_neither_compressed_nor_evicted(make_engine: EngineFactory) -> None:
    engine = engine_of(make_engine, 2, compress_before_evict="fp8")
    put_prompt(engine, PROMPTS[0])
    engine.pin(PROMPTS[0])
    for p in PROMPTS[1:8]:
        put_prompt(engine, p)
    assert not encoded(engine, PROMPTS[0]) and engine.lookup(PROMPTS[0]) == CHUNK


def test_compressed_chunks_are_decoded_on_load(make_engine: EngineFactory) -> None:
    engine = engine_of(make_engine, 3, compress_before_evict="fp8")
    keys = put_prompt(engine, PROMPTS[0])
    for p in PROMPTS[1:4]:
        put_prompt(engine, p)
    assert encoded(engine, PROMPTS[0])
    (kv,) = engine.get(keys)
    assert kv.shape == WIDE.shape(CHUNK) and not kv.isnan().any()


def test_an_unknown_method_stops_start_up_naming_the_key(make_engine: EngineFactory) -> None:
    with pytest.raises(ConfigError, match=r"compress_before_evict.*cachegen"):
        engine_of(make_engine, 2, compress_before_evict="cachegn")


def test_a_failing_compressor_falls_back_to_eviction(make_engine: EngineFactory) -> None:
    # A fake: a codec failing mid-batch cannot be caused with the real codecs.
    engine = engine_of(make_engine, 2, compress_before_evict="fp8")

    def broken(chunks: object) -> list[object]:
        raise RuntimeError("device lost")

    cpu_of(engine).compressor = broken  # type: ignore[assignment]
    for p in PROMPTS[:4]:
        put_prompt(engine, p)
    assert [engine.lookup(p) for p in PROMPTS[:4]] == [0, 0, CHUNK, CHUNK]


def test_kvtc_without_a_calibration_evicts_saying_why_once_then_compresses_once_calibrated(
    make_engine: EngineFactory, caplog: pytest.LogCaptureFixture
) -> None:
    engine = engine_of(make_engine, 4, compress_before_evict="kvtc")
    with caplog.at_level(logging.WARNING, logger="lmc_connector.cache.transforms"):
        for p in PROMPTS[:6]:
            put_prompt(engine, p)
    assert [engine.lookup(p) for p in PROMPTS[:6]] == [0, 0] + [CHUNK] * 4
    why = [r.getMessage() for r in caplog.records if "compress_before_evict" in r.getMessage()]
    assert len(why) == 1 and "calibrate" in why[0], why

    samples = [torch.randn(WIDE.shape(CHUNK), generator=torch.Generator().manual_seed(s))
               for s in range(2 * 256 // CHUNK + 1)]  # fmt: skip
    engine.calibrations.adopt("kvtc", fit_calibration("kvtc", samples))
    for p in PROMPTS[6:12]:
        put_prompt(engine, p)
    assert [engine.lookup(p) for p in PROMPTS[6:12]] == [CHUNK] * 6
    assert encoded(engine, PROMPTS[6]) and not encoded(engine, PROMPTS[11])
