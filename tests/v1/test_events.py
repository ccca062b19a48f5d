"""This cache's chunk events as vLLM KV events: what rank 0's worker buffers, what the
scheduler publishes, decoded as a subscriber decodes vLLM's `KVEventBatch`."""

from __future__ import annotations

import msgspec
from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch

from lmc_connector.v1.events import ChunkEventBuffer, EventDescriber
from tests.cache.conftest import CHUNK, EngineFactory, put_prompt
from tests.cache.conftest import make_engine as make_engine  # the fixture

PROMPT = list(range(1000, 1000 + 2 * CHUNK + 2))  # two full chunks and a partial one


def published(
    describer: EventDescriber, buffer: ChunkEventBuffer
) -> list[BlockStored | BlockRemoved | AllBlocksCleared]:
    """One engine step: the worker's events go to the scheduler, out on the wire, and back."""
    events = buffer.take()
    assert events is not None
    describer.add(events.get_all_events())
    # vLLM's KVEventBatch.events is typed as its three concrete events, while the connector API
    # (and so EventDescriber.take) hands out list[KVCacheEvent]; vLLM's scheduler passes those.
    wire = msgspec.msgpack.encode(KVEventBatch(ts=0.0, events=describer.take()))  # type: ignore[arg-type]
    return list(msgspec.msgpack.decode(wire, type=KVEventBatch).events)


def test_saved_chunks_are_stored_events_with_their_tokens_and_chained_keys(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(cpu_chunks=8)
    buffer = ChunkEventBuffer({t.name: t.event_medium for t in engine.tiers})
    engine.subscribe(buffer)
    describer = EventDescriber(CHUNK)
    keys = engine.hashes(PROMPT)
    describer.remember(keys, PROMPT)  # the scheduler saw the prompt
    put_prompt(engine, PROMPT)
    events = published(describer, buffer)
    assert [type(e) for e in events] == [BlockStored] * 3
    first, second, partial = events
    assert isinstance(first, BlockStored) and isinstance(second, BlockStored)
    assert (first.block_hashes, first.parent_block_hash) == ([keys[0]], None)
    assert (second.block_hashes, second.parent_block_hash) == ([keys[1]], keys[0])
    assert second.token_ids == PROMPT[CHUNK : 2 * CHUNK]
    assert (second.block_size, second.medium) == (CHUNK, "CPU")
    # A partial chunk cannot be described block-wise: vLLM's placeholder form.
    assert isinstance(partial, BlockStored)
    assert (partial.block_hashes, partial.token_ids, partial.block_size) == ([keys[2]], [], 0)


def test_spills_and_removals_carry_their_medium(make_engine: EngineFactory) -> None:
    engine = make_engine(cpu_chunks=1, disk_chunks=4)
    buffer = ChunkEventBuffer({t.name: t.event_medium for t in engine.tiers})
    engine.subscribe(buffer)
    describer = EventDescriber(CHUNK)
    a, b = PROMPT[:CHUNK], PROMPT[CHUNK : 2 * CHUNK]
    describer.remember(engine.hashes(a), a)
    put_prompt(engine, a)
    put_prompt(engine, b)  # a leaves memory for the disk
    engine.reset()
    events = published(describer, buffer)
    key_a, key_b = engine.hashes(a)[0], engine.hashes(b)[0]
    seen = [
        (type(e).__name__, e.medium, e.block_hashes)  # type: ignore[union-attr]
        for e in events
    ]
    assert seen == [
        ("BlockStored", "CPU", [key_a]),
        ("BlockRemoved", "CPU", [key_a]),
        ("BlockStored", "CPU", [key_b]),
        ("BlockStored", "STORAGE", [key_a]),
        ("BlockRemoved", "CPU", [key_b]),
        ("BlockRemoved", "STORAGE", [key_a]),
    ]
    stored_on_disk = events[3]
    assert isinstance(stored_on_disk, BlockStored) and stored_on_disk.token_ids == a
    assert buffer.take() is None  # nothing new since


def test_a_tier_without_a_medium_publishes_nothing(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(cpu_chunks=8)
    buffer = ChunkEventBuffer({"LocalCPUBackend": None})
    engine.subscribe(buffer)
    put_prompt(engine, PROMPT)
    assert buffer.take() is None
    assert engine.lookup(PROMPT) == len(PROMPT)
