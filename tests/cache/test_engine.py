from dataclasses import astuple

import pytest
import torch

from lmc_connector.cache import UnknownLocationError
from lmc_connector.tokens import ChunkKey
from tests.cache.conftest import (
    CHUNK,
    CHUNK_BYTES,
    EngineFactory,
    RecordingSink,
    make_kv,
    put_prompt,
    run_in_threads,
)

PROMPT = list(range(10))  # two full chunks and a partial one


def test_lookup_counts_the_cached_prefix_including_a_partial_chunk(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine()
    put_prompt(engine, PROMPT)
    assert engine.lookup(PROMPT) == 10
    assert engine.lookup([*PROMPT[:8], 99, 98]) == 8
    assert engine.lookup([7, *PROMPT[1:]]) == 0


def test_get_returns_chunks_in_prefix_order_and_stops_at_the_first_miss(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine()
    keys = put_prompt(engine, PROMPT)
    engine.remove(PROMPT[:8])  # drops chunks 0 and 1
    put_prompt(engine, PROMPT[:4])
    got = engine.get(keys)
    assert len(got) == 1
    assert torch.equal(got[0], make_kv(CHUNK, 0))


def test_put_copies_the_callers_tensor(make_engine: EngineFactory) -> None:
    engine = make_engine()
    kv = make_kv()
    key = engine.hashes(PROMPT[:4])[0]
    engine.put(key, kv)
    kv.zero_()
    assert torch.equal(engine.get([key])[0], make_kv())


def test_put_rejects_a_chunk_of_another_layout(make_engine: EngineFactory) -> None:
    engine = make_engine()
    with pytest.raises(ValueError, match="does not fit layout"):
        engine.put(ChunkKey(1), torch.zeros(2, 3, CHUNK, 8, dtype=torch.float16))


def test_lru_eviction_spares_recently_used_chunks(make_engine: EngineFactory) -> None:
    engine = make_engine(cpu_chunks=3)
    prompts = [[p * 100 + i for i in range(CHUNK)] for p in range(4)]
    for p in prompts[:3]:
        put_prompt(engine, p)
    engine.get(engine.hashes(prompts[0]))  # chunk 0 becomes most recent
    put_prompt(engine, prompts[3])
    assert [engine.lookup(p) for p in prompts] == [CHUNK, 0, CHUNK, CHUNK]


def test_pinned_chunks_are_never_evicted(make_engine: EngineFactory) -> None:
    engine = make_engine(cpu_chunks=2)
    prompts = [[p * 100 + i for i in range(CHUNK)] for p in range(3)]
    put_prompt(engine, prompts[0])
    assert engine.pin(prompts[0]) == CHUNK
    put_prompt(engine, prompts[1])
    put_prompt(engine, prompts[2])
    assert engine.lookup(prompts[0]) == CHUNK
    assert engine.lookup(prompts[1]) == 0


def test_put_that_cannot_fit_beside_pinned_chunks_fails_without_evicting(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(cpu_chunks=1)
    put_prompt(engine, PROMPT[:4])
    engine.pin(PROMPT[:4])
    assert not engine.put(engine.hashes([9, 9, 9, 9])[0], make_kv())
    assert engine.lookup(PROMPT[:4]) == CHUNK


def test_unpin_releases_chunks_for_eviction(make_engine: EngineFactory) -> None:
    engine = make_engine(cpu_chunks=1)
    put_prompt(engine, PROMPT[:4])
    engine.pin(PROMPT[:4])
    assert engine.unpin(PROMPT[:4]) == CHUNK
    assert engine.put(engine.hashes([9, 9, 9, 9])[0], make_kv())
    assert engine.lookup(PROMPT[:4]) == 0


def test_lookup_with_pin_pins_exactly_the_hit(make_engine: EngineFactory) -> None:
    engine = make_engine()
    keys = put_prompt(engine, PROMPT[:8])
    assert engine.lookup(PROMPT, pin=True) == 8
    assert [engine.is_pinned(k) for k in engine.hashes(PROMPT)] == [True, True, False]
    engine.unpin_keys(keys)
    assert not any(engine.is_pinned(k) for k in keys)


def test_every_admit_and_evict_is_reported(make_engine: EngineFactory) -> None:
    engine = make_engine(cpu_chunks=1)
    sink = RecordingSink()
    engine.subscribe(sink)
    a = put_prompt(engine, [1, 2, 3, 4])
    b = put_prompt(engine, [5, 6, 7, 8])
    engine.clear()
    cpu = "LocalCPUBackend"
    assert sink.events == [
        ("admit", cpu, a[0]),
        ("evict", cpu, a[0]),
        ("admit", cpu, b[0]),
        ("evict", cpu, b[0]),
    ]


def test_clear_keeps_pinned_chunks(make_engine: EngineFactory) -> None:
    engine = make_engine()
    put_prompt(engine, PROMPT)
    engine.pin(PROMPT[:4])
    assert engine.clear("LocalCPUBackend") == (2, 1, 6)
    assert engine.lookup(PROMPT) == CHUNK


def test_unknown_location_lists_the_valid_ones(make_engine: EngineFactory) -> None:
    engine = make_engine()
    with pytest.raises(
        UnknownLocationError, match=r"did you mean LocalCPUBackend.*has: LocalCPUBackend"
    ):
        engine.lookup(PROMPT, locations=["LocalCPUBackends"])


def test_concurrent_puts_gets_and_clears_keep_the_index_consistent(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(cpu_chunks=8)

    def worker(seed: int) -> None:
        for i in range(200):
            tokens = [seed * 10_000 + (i % 16) * 10 + j for j in range(CHUNK)]
            put_prompt(engine, tokens, seed=i)
            for kv in engine.get(engine.hashes(tokens)):
                assert kv.shape == (2, 2, CHUNK, 8)
            if i % 50 == 0:
                engine.clear()

    assert not run_in_threads(worker, 4)
    chunks, used, capacity = astuple(engine.usage()["LocalCPUBackend"])
    assert used == chunks * 2 * 2 * CHUNK * 8 * 2 <= capacity


def test_unsubscribed_sink_hears_nothing_more(make_engine: EngineFactory) -> None:
    engine = make_engine()
    sink = RecordingSink()
    engine.subscribe(sink)
    put_prompt(engine, [1, 2, 3, 4])
    engine.unsubscribe(sink)
    put_prompt(engine, [5, 6, 7, 8])
    assert [e[0] for e in sink.events] == ["admit"]


def test_prefill_touches_the_cpu_tiers_pool_as_full_chunk_buffers(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(cpu_chunks=40)  # a pool of a quarter of the tier: 10 chunks
    assert engine.prefill_buffers() == 10 * CHUNK_BYTES
    engine.new_buffer(tuple(make_kv().shape), torch.float16)
    assert engine.prefill_buffers() == CHUNK_BYTES  # tops the pool up again


def test_prefill_without_a_cpu_tier_touches_nothing(make_engine: EngineFactory) -> None:
    engine = make_engine(disk_chunks=4, local_cpu=False)
    assert engine.prefill_buffers() == 0
