"""The scheduler half's view for vLLM: where a hit's tokens come from, its statistics, and a
cache reset relayed to every rank (real lookup servers on IPC sockets, CPU and disk tiers)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from lmc_connector.cache import CacheEngine
from lmc_connector.config import load_config
from lmc_connector.v1.lookup import LookupServer
from lmc_connector.v1.scheduler import LMCScheduler
from tests.cache.conftest import CHUNK, CHUNK_BYTES, LAYOUT, put_prompt
from tests.v1.lookup_ranks import scheduler_over

PROMPT = list(range(2000, 2000 + 3 * CHUNK))
OTHER = list(range(3000, 3000 + CHUNK))
Ranks = tuple[LMCScheduler, list[CacheEngine], list[LookupServer]]


@pytest.fixture
def ranks(tmp_path: Path) -> Iterator[Ranks]:
    """Two ranks whose CPU tier holds 3 chunks and spills into a disk tier."""
    engines = []
    for rank in range(2):
        config = load_config(
            {
                "chunk_size": CHUNK,
                "max_local_cpu_size": 3 * CHUNK_BYTES / 1e9,
                "local_disk": str(tmp_path / f"disk{rank}"),
                "max_local_disk_size": 8 * (CHUNK_BYTES + 64) / 1e9,
            },
            env={},
        )
        engine = CacheEngine(config, LAYOUT)
        engine.open()
        engines.append(engine)
    with scheduler_over(engines, tmp_path) as (scheduler, servers):
        yield scheduler, engines, servers


def test_hit_sources_split_the_loaded_tokens_by_the_tier_holding_them(ranks: Ranks) -> None:
    scheduler, engines, _ = ranks
    for engine in engines:
        put_prompt(engine, PROMPT)
        put_prompt(engine, OTHER)  # PROMPT's first chunk spills to disk
    loadable, _ = scheduler.num_new_matched_tokens("r1", PROMPT, 0)
    assert loadable == len(PROMPT) - 1  # vLLM computes the last token itself
    scheduler.after_alloc("r1", loadable, [0, 1])
    assert scheduler.hit_sources("r1", loadable) == {
        CacheHitSource.DISK: CHUNK,
        CacheHitSource.HOST: len(PROMPT) - 1 - CHUNK,
    }
    # A load that starts past the disk chunk (vLLM computed it already) is all host.
    assert scheduler.num_new_matched_tokens("r2", PROMPT, CHUNK) == (len(PROMPT) - 1 - CHUNK, False)
    scheduler.after_alloc("r2", len(PROMPT) - 1 - CHUNK, [0, 1])
    assert scheduler.hit_sources("r2", 2 * CHUNK - 1) == {CacheHitSource.HOST: 2 * CHUNK - 1}


def test_statistics_count_lookups_and_planned_loads(ranks: Ranks) -> None:
    scheduler, engines, _ = ranks
    for engine in engines:
        put_prompt(engine, PROMPT)
    scheduler.num_new_matched_tokens("hit", PROMPT, 0)
    scheduler.after_alloc("hit", len(PROMPT) - 1, [0, 1])
    scheduler.num_new_matched_tokens("miss", OTHER, 0)
    stats = scheduler.take_stats()
    assert stats is not None
    assert stats.data["counters"] == {
        "lookups": 2,
        "lookup_hits": 1,
        "hit_tokens": len(PROMPT) - 1,
    }
    assert len(stats.data["histograms"]["lookup_seconds"]) == 2
    assert scheduler.take_stats() is None


def test_reset_empties_every_rank_and_the_next_lookup_misses(ranks: Ranks) -> None:
    scheduler, engines, _ = ranks
    for engine in engines:
        put_prompt(engine, PROMPT)
        put_prompt(engine, OTHER)
    assert scheduler.num_new_matched_tokens("before", PROMPT, 0)[0] > 0  # pins PROMPT's chunks
    assert scheduler.reset(shared=False) is True
    assert all(u.chunks == 0 for e in engines for u in e.usage().values())
    assert scheduler.num_new_matched_tokens("after", PROMPT, 0) == (0, False)


def test_reset_is_reported_failed_when_a_rank_does_not_answer(ranks: Ranks) -> None:
    scheduler, engines, servers = ranks
    for engine in engines:
        put_prompt(engine, PROMPT)
    servers[1].close()
    assert scheduler.reset(shared=False, timeout_s=0.5) is False
