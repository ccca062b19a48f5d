"""Lookup pins across tensor-parallel ranks: real lookup servers on IPC sockets, CPU engines.

Rank 0 holds a prompt's chunks, rank 1 holds none, so the scheduler's hit
(the minimum over ranks) is 0. Rank 0 pinned its chunks while answering;
those pins must not outlive the lookup.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lmc_connector.cache import CacheEngine
from lmc_connector.config import load_config
from lmc_connector.v1.scheduler import LMCScheduler
from tests.cache.conftest import CHUNK, LAYOUT, put_prompt
from tests.control.harness import wait_until
from tests.v1.lookup_ranks import scheduler_over

PROMPT = list(range(3 * CHUNK))


@pytest.fixture
def ranks(tmp_path: Path) -> Iterator[tuple[LMCScheduler, list[CacheEngine]]]:
    config = load_config({"chunk_size": CHUNK}, env={})
    engines = [CacheEngine(config, LAYOUT) for _ in range(2)]
    with scheduler_over(engines, tmp_path) as (scheduler, _):
        yield scheduler, engines


def pinned(engine: CacheEngine) -> int:
    return sum(engine.is_pinned(k) for k in engine.hashes(PROMPT))


def test_a_miss_on_one_rank_releases_the_pins_of_the_others(
    ranks: tuple[LMCScheduler, list[CacheEngine]],
) -> None:
    scheduler, (rank0, _) = ranks
    put_prompt(rank0, PROMPT)
    assert scheduler.num_new_matched_tokens("r1", PROMPT, 0) == (0, False)
    assert wait_until(lambda: pinned(rank0) == 0)


def test_a_hit_on_every_rank_stays_pinned_until_finished(
    ranks: tuple[LMCScheduler, list[CacheEngine]],
) -> None:
    scheduler, engines = ranks
    for engine in engines:
        put_prompt(engine, PROMPT)
    assert scheduler.num_new_matched_tokens("r1", PROMPT, 0) == (len(PROMPT) - 1, False)
    assert all(pinned(e) == 3 for e in engines)
    scheduler.finished("r1")
    assert wait_until(lambda: all(pinned(e) == 0 for e in engines))
