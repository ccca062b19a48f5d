"""The worker half on CPU tensors laid out like vLLM's: background saves, chunked loads, KV
types that are not floats, and what vLLM is told about finished requests.

Each test builds an `LMCWorker` over per-layer views of one shared buffer (as
vLLM allocates them), fills some blocks with known values, saves them through
the metadata the scheduler half would send, and reads them back.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from lmc_connector import tokens
from lmc_connector.cache import ChunkLayout
from lmc_connector.config import ConfigError, load_config
from lmc_connector.ops.paged import KVFormat
from lmc_connector.tokens import ChunkKey
from lmc_connector.v1.decode_buffers import DecodeBuffers
from lmc_connector.v1.loader import FETCH_CHUNKS
from lmc_connector.v1.metadata import LMCConnectorMetadata, LoadSpec, SaveSpec
from lmc_connector.v1.worker import LMCWorker, WorkerSettings
from tests.control.harness import wait_until

BLOCK, CHUNK, HEADS, HEAD, BLOCKS = 16, 32, 2, 8, 64

WorkerFactory = Callable[..., LMCWorker]


def make_caches(
    layers: int = 2, dtype: torch.dtype = torch.float32, blocks: int = BLOCKS, head: int = HEAD
) -> dict[str, torch.Tensor]:
    """Per-layer `[blocks, heads, block, 2 * head]` views into one cross-layer buffer."""
    buffer = torch.zeros(blocks, layers, HEADS, BLOCK, 2 * head, dtype=torch.float32)
    buffer = buffer.to(dtype) if dtype.is_floating_point else buffer.to(torch.int8).view(dtype)
    return {f"layer{i}": buffer[:, i] for i in range(layers)}


def fill(caches: dict[str, torch.Tensor], blocks: list[int], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for kv in caches.values():
        values = torch.randint(-100, 100, kv[blocks].shape, generator=gen, dtype=torch.int8)
        kv[blocks] = values.to(kv.dtype) if kv.dtype.is_floating_point else values.view(kv.dtype)


@pytest.fixture
def make_worker(tmp_path: Path) -> Iterator[WorkerFactory]:
    workers: list[LMCWorker] = []

    def build(
        caches: dict[str, torch.Tensor],
        fmt: KVFormat = KVFormat.PACKED,
        cache_dtype: str = "auto",
        **extra: object,
    ) -> LMCWorker:
        config = load_config({"chunk_size": CHUNK, **extra}, env={})
        address = f"ipc://{tmp_path}/lookup-{len(workers)}.sock"
        worker = LMCWorker(
            config, WorkerSettings("m", 0, 1, BLOCK, address, cache_dtype=cache_dtype)
        )
        worker.register_kv_caches(caches, fmt, "TEST_BACKEND")
        workers.append(worker)
        return worker

    yield build
    for worker in workers:
        worker.close()


def keys_of(n_tokens: int, seed: int = 0) -> list[ChunkKey]:
    return tokens.chunk_hashes([seed * 1000 + t for t in range(n_tokens)], CHUNK)


def save_meta(
    req_id: str, keys: list[ChunkKey], n_tokens: int, blocks: list[int]
) -> LMCConnectorMetadata:
    bounds = tokens.chunk_bounds(n_tokens, CHUNK)
    return LMCConnectorMetadata(saves=[SaveSpec(req_id, keys, bounds, blocks)])


def load_meta(
    req_id: str, keys: list[ChunkKey], end: int, blocks: list[int]
) -> LMCConnectorMetadata:
    return LMCConnectorMetadata(loads=[LoadSpec(req_id, keys, 0, 0, end, blocks)])


@pytest.mark.parametrize(
    ("dtype", "cache_dtype"),
    [
        (torch.int8, "int8_per_token_head"),
        (torch.float8_e4m3fn, "fp8_e4m3"),
        (torch.float8_e5m2, "fp8_e5m2"),
        (torch.uint8, "fp8"),
    ],
)
def test_quantized_kv_saves_and_loads_bit_exact(
    make_worker: WorkerFactory, dtype: torch.dtype, cache_dtype: str
) -> None:
    caches = make_caches(dtype=dtype)
    worker = make_worker(caches, cache_dtype=cache_dtype)
    fill(caches, [3, 7, 9], seed=1)
    keys = keys_of(40)
    worker.save(save_meta("a", keys, 40, [3, 7, 9]))
    assert worker.saver is not None and worker.saver.drain()
    assert worker.saver.stats.stored == 2
    before = {n: kv[[3, 7, 9]].clone() for n, kv in caches.items()}

    worker.start_load(load_meta("b", keys, 40, [11, 12, 13]))
    assert worker.take_load_errors() == set()
    for name, kv in caches.items():
        got = kv[[11, 12, 13]].view(torch.uint8)
        want = before[name].view(torch.uint8)
        assert torch.equal(got[:2], want[:2])  # two whole blocks
        assert torch.equal(got[2, :, : 40 - 2 * BLOCK], want[2, :, : 40 - 2 * BLOCK])


def test_kv_cache_type_and_backend_separate_namespaces(make_worker: WorkerFactory) -> None:
    e4m3 = make_worker(make_caches(dtype=torch.uint8), cache_dtype="fp8_e4m3")
    e5m2 = make_worker(make_caches(dtype=torch.uint8), cache_dtype="fp8_e5m2")
    assert e4m3.engine is not None and e5m2.engine is not None
    assert e4m3.engine.layout.dtype == e5m2.engine.layout.dtype == "uint8"
    assert e4m3.engine.layout.fingerprint() != e5m2.engine.layout.fingerprint()
    other_backend = dataclasses.replace(e4m3.engine.layout, backend="FLASHINFER")
    assert other_backend.fingerprint() != e4m3.engine.layout.fingerprint()


def test_a_model_revision_or_quantization_separates_namespaces() -> None:
    from types import SimpleNamespace

    from lmc_connector.v1.connector import model_variant

    plain = SimpleNamespace(revision=None, quantization=None)
    pinned = SimpleNamespace(revision="abc123", quantization="awq")
    assert model_variant(plain) == ""
    assert model_variant(pinned) == "revision=abc123|quantization=awq"
    layout = ChunkLayout("m", 1, 0, "bfloat16", 2, 4, 64, 16)
    revised = dataclasses.replace(layout, variant=model_variant(pinned))
    assert revised.fingerprint() != layout.fingerprint()
    assert revised.instance_fingerprint() != layout.instance_fingerprint()


def test_quantized_chunks_refuse_compression(make_worker: WorkerFactory) -> None:
    worker = make_worker(make_caches(dtype=torch.uint8), cache_dtype="fp8_e4m3")
    assert worker.engine is not None
    with pytest.raises(ValueError, match=r"fp8_e4m3.*float16/bfloat16/float32"):
        worker.engine.schedule("compress", list(range(CHUNK)), "cachegen", "LocalCPUBackend")


def test_quantized_chunks_cannot_be_compressed_before_eviction(
    make_worker: WorkerFactory,
) -> None:
    with pytest.raises(ConfigError, match=r"compress_before_evict=fp8: .*fp8_e5m2"):
        make_worker(
            make_caches(dtype=torch.uint8), cache_dtype="fp8_e5m2", compress_before_evict="fp8"
        )


def test_quantized_chunks_cannot_go_to_the_store_through_a_codec(
    make_worker: WorkerFactory,
) -> None:
    store = {"remote_url": "redis://127.0.0.1:1", "remote_serde": "cachegen"}
    with pytest.raises(
        ConfigError, match=r"remote_serde=cachegen: .*fp8_e4m3.*remote_serde: naive"
    ):
        make_worker(make_caches(dtype=torch.uint8), cache_dtype="fp8_e4m3", **store)


def test_save_returns_before_the_copy_completes(make_worker: WorkerFactory) -> None:
    """The copy waits for the cache (held by another thread here): `save` does not."""
    caches = make_caches()
    worker = make_worker(caches)
    fill(caches, [1, 2], seed=2)
    keys = keys_of(CHUNK)
    engine = worker.engine
    assert engine is not None and worker.saver is not None
    held, release = threading.Event(), threading.Event()

    def hold_the_cache() -> None:
        with engine.lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold_the_cache)
    holder.start()
    try:
        assert held.wait(10)
        returned = threading.Event()

        def save() -> None:
            worker.save(save_meta("a", keys, CHUNK, [1, 2]))
            returned.set()

        saving = threading.Thread(target=save)
        saving.start()
        assert returned.wait(10), "save waited for the copy"
        assert worker.finished_saves({"a"}) == set()  # vLLM keeps the blocks meanwhile
    finally:
        release.set()
        holder.join()
    assert worker.saver.drain()
    assert worker.finished_saves(set()) == {"a"}
    (chunk,) = engine.get(keys)
    assert worker.paged is not None
    assert torch.equal(chunk, worker.paged.read([1, 2], 0, CHUNK))


def test_a_racing_load_sees_a_whole_chunk_or_a_miss(make_worker: WorkerFactory) -> None:
    """Loads and lookups that arrive while a save is copying never see a partial chunk."""
    caches = make_caches(layers=16, blocks=2 * 40 + 8, head=64)
    worker = make_worker(caches, max_local_cpu_size=2.0)
    engine, paged = worker.engine, worker.paged
    assert engine is not None and paged is not None
    outcomes = {"whole": 0, "miss": 0}
    for round_ in range(40):
        blocks = [2 * round_ % 80, 2 * round_ % 80 + 1]
        fill(caches, blocks, seed=round_)
        want = paged.read(blocks, 0, CHUNK)
        keys = keys_of(CHUNK, seed=round_ + 1)
        worker.save(save_meta(f"r{round_}", keys, CHUNK, blocks))
        while True:
            got = engine.get(keys)
            if got:
                assert torch.equal(got[0], want), f"round {round_}: a partial chunk was served"
                outcomes["whole"] += 1
                break
            outcomes["miss"] += 1
        # A load racing the next save: all of it or a reported error, never a mix.
        target = [84, 85]
        for kv in caches.values():
            kv[target] = 0
        next_keys = keys_of(CHUNK, seed=round_ + 100)
        worker.save(save_meta(f"s{round_}", next_keys, CHUNK, blocks))
        worker.start_load(load_meta(f"l{round_}", next_keys, CHUNK, target))
        errors = worker.take_load_errors()
        if errors:
            assert errors == set(target)
        else:
            assert torch.equal(paged.read(target, 0, CHUNK), want)
    assert worker.saver is not None and worker.saver.drain()
    assert outcomes["whole"] == 40


def test_full_queue_drops_and_counts_never_waits(make_worker: WorkerFactory) -> None:
    caches = make_caches()
    worker = make_worker(caches, save_queue_chunks=2)
    engine, saver = worker.engine, worker.saver
    assert engine is not None and saver is not None
    with engine.lock:  # the save thread cannot store: the queue fills up
        worker.save(save_meta("a", keys_of(5 * CHUNK), 5 * CHUNK, list(range(10))))
    assert saver.drain()
    assert saver.stats.dropped_full >= 2
    assert saver.stats.stored + saver.stats.dropped_full == 5
    assert worker.finished_saves({"a"}) == {"a"}


def test_preemption_cancels_queued_saves_and_waits_for_the_running_one(
    make_worker: WorkerFactory,
) -> None:
    caches = make_caches()
    worker = make_worker(caches)
    engine, saver = worker.engine, worker.saver
    assert engine is not None and saver is not None
    cancelled = threading.Event()
    with engine.lock:
        worker.save(save_meta("a", keys_of(4 * CHUNK), 4 * CHUNK, list(range(8))))
        wait_until(lambda: saver._current is not None, what="the first chunk in progress")
        preempt = LMCConnectorMetadata(preempted=["a"])

        def cancel() -> None:
            worker.before_forward(preempt)
            cancelled.set()

        canceller = threading.Thread(target=cancel)
        canceller.start()
        # The chunk in progress is stuck behind the lock: the cancel must wait for it.
        assert not cancelled.wait(0.3)
    canceller.join(10)
    assert cancelled.is_set()
    assert saver.stats.dropped_preempted >= 2
    assert saver.stats.stored <= 1
    assert worker.finished_saves({"a"}) == {"a"}


def test_compressed_chunks_load_through_batched_decode(make_worker: WorkerFactory) -> None:
    caches = make_caches(dtype=torch.float16, head=32)
    worker = make_worker(caches)
    engine, paged = worker.engine, worker.paged
    assert engine is not None and paged is not None
    blocks = list(range(10))
    fill(caches, blocks, seed=5)
    n = 5 * CHUNK - 3
    prompt = list(range(n))
    keys = tokens.chunk_hashes(prompt, CHUNK)
    worker.save(save_meta("a", keys, n, blocks))
    assert worker.saver is not None and worker.saver.drain()
    want = paged.read(blocks, 0, n - 1)
    engine.compress(prompt[: 3 * CHUNK], "fp8", "LocalCPUBackend")  # chunks 0-2 encoded

    target = list(range(20, 30))
    worker.start_load(load_meta("b", keys, n - 1, target))
    assert worker.take_load_errors() == set()
    got = paged.read(target, 0, n - 1)
    assert torch.equal(got[:, :, 3 * CHUNK :], want[:, :, 3 * CHUNK :])
    assert torch.allclose(got.float(), want.float(), rtol=0.07, atol=0.5)


def test_compressed_chunks_decode_into_the_same_few_buffers_every_round(
    make_worker: WorkerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    handed: list[int] = []
    take = DecodeBuffers.__call__

    def recorded(self: DecodeBuffers, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        out = take(self, shape, dtype)
        handed.append(out.data_ptr())
        return out

    monkeypatch.setattr(DecodeBuffers, "__call__", recorded)
    caches = make_caches(dtype=torch.float16, head=32)
    worker = make_worker(caches)
    engine, paged = worker.engine, worker.paged
    assert engine is not None and paged is not None
    blocks = list(range(18))
    fill(caches, blocks, seed=7)
    n = 9 * CHUNK
    prompt = list(range(n))
    keys = tokens.chunk_hashes(prompt, CHUNK)
    worker.save(save_meta("a", keys, n, blocks))
    assert worker.saver is not None and worker.saver.drain()
    want = paged.read(blocks, 0, n - 1)
    engine.compress(prompt, "fp8", "LocalCPUBackend")

    for req, first in (("b", 20), ("c", 40)):
        target = list(range(first, first + 18))
        worker.start_load(load_meta(req, keys, n - 1, target))
        assert worker.take_load_errors() == set()
        got = paged.read(target, 0, n - 1)
        assert torch.allclose(got.float(), want.float(), rtol=0.07, atol=0.5)
    assert len(handed) == 2 * 9
    assert len(set(handed)) == FETCH_CHUNKS


def three_saved_chunks(make_worker: WorkerFactory) -> tuple[LMCWorker, list[ChunkKey]]:
    """A worker holding the three chunks of a prompt, saved from blocks 0-5."""
    caches = make_caches(dtype=torch.float16, head=32)
    worker = make_worker(caches)
    fill(caches, list(range(6)), seed=6)
    keys = tokens.chunk_hashes(list(range(3 * CHUNK)), CHUNK)
    worker.save(save_meta("a", keys, 3 * CHUNK, list(range(6))))
    assert worker.saver is not None and worker.saver.drain()
    return worker, keys


def test_a_short_chunk_before_the_last_stops_the_load_and_reports_the_rest(
    make_worker: WorkerFactory,
) -> None:
    worker, keys = three_saved_chunks(make_worker)
    assert worker.engine is not None
    # What a faulty peer or store could hand over: chunk 1 holding half its tokens.
    tier = worker.engine.tier("LocalCPUBackend")
    marker, chunk = tier.load(keys[1])
    assert chunk is not None and chunk.kv is not None
    short = type(chunk)(BLOCK, kv=chunk.kv[:, :, :BLOCK].clone())
    assert tier.replace(keys[1], marker, short)

    target = list(range(40, 46))
    worker.start_load(load_meta("b", keys, 3 * CHUNK - 1, target))
    assert worker.take_load_errors() == set(target[2:])  # chunk 0 only; the rest recomputed


def test_a_corrupted_chunk_stops_the_load_and_reports_the_rest(
    make_worker: WorkerFactory,
) -> None:
    worker, keys = three_saved_chunks(make_worker)
    engine = worker.engine
    assert engine is not None
    engine.compress(list(range(3 * CHUNK)), "fp8", "LocalCPUBackend")
    tier = engine.tier("LocalCPUBackend")
    marker, chunk = tier.load(keys[1])
    assert chunk is not None and chunk.blob is not None
    blob = bytes(chunk.blob)
    broken = type(chunk)(chunk.num_tokens, blob=blob[:-9] + b"corrupted", method="fp8")
    assert tier.replace(keys[1], marker, broken)

    target = list(range(40, 46))
    worker.start_load(load_meta("b", keys, 3 * CHUNK - 1, target))
    # Chunk 0 loaded; chunk 1 fails its checksum: its blocks and all after are recomputed.
    assert worker.take_load_errors() == set(target[2:])
