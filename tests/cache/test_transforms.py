import dataclasses
import threading
import time
from collections.abc import Iterator, Sequence

import pytest
import torch

from lmc_connector.cache import CacheEngine, TransformJob, UnknownLocationError
from lmc_connector.cache.errors import StoredMethodError
from lmc_connector.ops.allocator import Allocator
from lmc_connector.ops.codecs import UnknownCodecError, get_codec, register, unregister
from tests.cache.conftest import (
    CHUNK,
    CHUNK_BYTES,
    LAYOUT,
    EngineFactory,
    make_kv,
    put_prompt,
)

PROMPT = list(range(10))
CPU = "LocalCPUBackend"
#: Chunks big enough that compression beats its own header (64 KiB each).
WIDE = dataclasses.replace(LAYOUT, layers=4, channels=128)
WIDE_BYTES = 2 * 4 * CHUNK * 128 * 2


def wide_engine(make_engine: EngineFactory, chunks: float) -> CacheEngine:
    return make_engine(cpu_chunks=chunks * WIDE_BYTES / CHUNK_BYTES, layout=WIDE)


def put_wide(engine: CacheEngine, tokens: list[int]) -> None:
    for i, key in enumerate(engine.hashes(tokens)):
        n = min(CHUNK, len(tokens) - i * CHUNK)
        assert engine.put(key, torch.randn(WIDE.shape(n)).half())


def test_compress_returns_the_tokens_cached_in_that_location(make_engine: EngineFactory) -> None:
    engine = make_engine()
    put_prompt(engine, PROMPT[:8])
    assert engine.compress(PROMPT, "fp8", CPU) == 8


def test_compressed_chunks_take_less_room(make_engine: EngineFactory) -> None:
    engine = wide_engine(make_engine, chunks=4)
    put_wide(engine, PROMPT)
    before = engine.usage()[CPU].used_bytes
    engine.compress(PROMPT, "cachegen", CPU)
    assert engine.usage()[CPU].used_bytes < before / 2


def test_get_decodes_compressed_chunks_transparently(make_engine: EngineFactory) -> None:
    engine = make_engine()
    keys = put_prompt(engine, PROMPT)
    engine.compress(PROMPT, "fp8", CPU)
    got = engine.get(keys)
    assert [g.shape for g in got] == [make_kv(n).shape for n in (CHUNK, CHUNK, 2)]
    assert all(g.dtype == torch.float16 for g in got)
    error = (got[0].float() - make_kv(CHUNK, 0).float()).norm() / make_kv(CHUNK, 0).float().norm()
    assert error < 0.1


def test_decompress_restores_the_decoded_approximation(make_engine: EngineFactory) -> None:
    engine = make_engine()
    keys = put_prompt(engine, PROMPT)
    engine.compress(PROMPT, "cachegen", CPU)
    served_compressed = engine.get(keys)
    assert engine.decompress(PROMPT, "cachegen", CPU) == 10
    assert engine.usage()[CPU].used_bytes == sum(g.numel() * 2 for g in served_compressed)
    for before, after in zip(served_compressed, engine.get(keys), strict=True):
        assert torch.equal(before, after)


def test_compression_makes_room_for_more_chunks(make_engine: EngineFactory) -> None:
    engine = wide_engine(make_engine, chunks=2)
    first = [[p * 100 + i for i in range(CHUNK)] for p in range(2)]
    for p in first:
        put_wide(engine, p)
    for p in first:
        engine.compress(p, "cachegen", CPU)
    put_wide(engine, [7] * CHUNK)
    assert [engine.lookup(p) for p in [*first, [7] * CHUNK]] == [CHUNK, CHUNK, CHUNK]


def test_a_decompress_without_room_reports_it_once_not_per_chunk(
    make_engine: EngineFactory,
) -> None:
    engine = wide_engine(make_engine, chunks=2)
    prompts = [[p * 100 + i for i in range(CHUNK)] for p in range(4)]
    for p in prompts:
        put_wide(engine, p)
        engine.compress(p, "cachegen", CPU)
    job = engine.run(engine.schedule("decompress", None, "cachegen", CPU))
    assert job.outcome.chunks_done < len(prompts)  # the plain ones do not all fit
    assert job.outcome.errors == [f"no room in {CPU} for decompressed chunks"]


def test_unknown_method_lists_the_registered_ones(make_engine: EngineFactory) -> None:
    engine = make_engine()
    put_prompt(engine, PROMPT)
    with pytest.raises(UnknownCodecError, match=r"cachegen.*fp8"):
        engine.compress(PROMPT, "cachegn", CPU)
    assert not any(engine.is_pinned(k) for k in engine.hashes(PROMPT))


def test_unknown_location_lists_the_valid_ones(make_engine: EngineFactory) -> None:
    engine = make_engine()
    with pytest.raises(UnknownLocationError, match="LocalCPUBackend"):
        engine.compress(PROMPT, "cachegen", "LocalGPUBackend")


class FailingCodec:
    """A fake, registered like any codec: one that fails mid-batch cannot be caused with the
    real codecs."""

    name = "failing"

    def encode(self, kv: torch.Tensor) -> bytes:
        raise RuntimeError("device lost")

    def decode(
        self,
        blob: bytes,
        device: torch.device | str | None = None,
        allocate: Allocator | None = None,
    ) -> torch.Tensor:
        raise RuntimeError("device lost")

    def encode_batch(self, kvs: Sequence[torch.Tensor]) -> list[bytes]:
        raise RuntimeError("device lost")

    def decode_batch(
        self,
        blobs: Sequence[bytes],
        device: torch.device | str | None = None,
        allocate: Allocator | None = None,
    ) -> list[torch.Tensor]:
        raise RuntimeError("device lost")


@pytest.fixture
def failing_codec() -> Iterator[str]:
    register("failing", 250, "tests.cache.test_transforms:FailingCodec")
    yield "failing"
    unregister("failing")


def test_failed_encode_leaves_the_plain_chunks_in_place(
    make_engine: EngineFactory, failing_codec: str
) -> None:
    engine = make_engine()
    keys = put_prompt(engine, PROMPT)
    job = engine.run(engine.schedule("compress", PROMPT, failing_codec, CPU))
    assert job.outcome.errors and "device lost" in job.outcome.errors[0]
    assert engine.usage()[CPU].used_bytes == 2 * CHUNK_BYTES + CHUNK_BYTES // 2
    assert torch.equal(engine.get(keys)[1], make_kv(CHUNK, 1))
    assert not any(engine.is_pinned(k) for k in keys)


def test_scheduled_job_pins_its_chunks_until_it_has_run(make_engine: EngineFactory) -> None:
    engine = make_engine(cpu_chunks=3)
    keys = put_prompt(engine, PROMPT)
    job: TransformJob = engine.schedule("compress", PROMPT, "fp8", CPU)
    assert job.outcome.num_tokens == 10
    assert all(engine.is_pinned(k) for k in keys)
    engine.run(job)
    assert job.outcome.chunks_done == 3 and job.outcome.bytes_after < job.outcome.bytes_before
    assert not any(engine.is_pinned(k) for k in keys)


def test_loads_racing_compress_see_a_whole_chunk_either_way(make_engine: EngineFactory) -> None:
    engine = make_engine(cpu_chunks=8)
    keys = put_prompt(engine, PROMPT)
    originals = engine.get(keys)
    codec = get_codec("cachegen")
    decoded = [codec.decode(codec.encode(kv)) for kv in originals]
    stop = threading.Event()
    loads: list[str] = []

    def loader() -> None:
        while not stop.is_set():
            for i, got in enumerate(engine.get(keys)):
                if torch.equal(got, originals[i]):
                    loads.append("plain")
                elif torch.equal(got, decoded[i]):
                    loads.append("encoded")
                else:
                    loads.append("half state")

    thread = threading.Thread(target=loader)
    thread.start()

    def let_loader_run() -> None:
        seen, deadline = len(loads), time.monotonic() + 10
        while len(loads) < seen + 6 and time.monotonic() < deadline:
            time.sleep(0.001)

    for _ in range(10):
        engine.compress(PROMPT, "cachegen", CPU)
        let_loader_run()
        engine.remove(PROMPT)
        put_prompt(engine, PROMPT)
        let_loader_run()
    stop.set()
    thread.join(timeout=30)
    assert "half state" not in loads
    assert {"plain", "encoded"} <= set(loads)


def test_without_tokens_every_chunk_of_the_location_is_covered(make_engine: EngineFactory) -> None:
    engine = make_engine(cpu_chunks=8)
    keys = put_prompt(engine, PROMPT) + put_prompt(engine, [50, 51, 52, 53, 54], seed=9)
    job = engine.schedule("compress", None, "fp8", CPU)
    assert job.outcome.num_tokens == 10 + 5
    assert all(engine.is_pinned(k) for k in keys)
    engine.run(job)
    assert job.outcome.chunks_done == 5
    assert engine.decompress(None, "fp8", CPU) == 15
    assert engine.usage()[CPU].used_bytes == 3 * CHUNK_BYTES + 3 * CHUNK_BYTES // 4


def test_decompress_with_another_method_than_stored_names_what_is_stored(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine()
    keys = put_prompt(engine, PROMPT)
    engine.compress(PROMPT, "fp8", CPU)
    with pytest.raises(StoredMethodError, match=r"stored with fp8 \(3 chunks\), not cachegen"):
        engine.schedule("decompress", PROMPT, "cachegen", CPU)
    assert not any(engine.is_pinned(k) for k in keys)
    assert all(c.encoded for c in (engine.tier(CPU).load(k)[1] for k in keys) if c)


def test_decompress_of_mixed_methods_restores_only_its_own(make_engine: EngineFactory) -> None:
    engine = make_engine()
    keys = put_prompt(engine, PROMPT)
    engine.compress(PROMPT[:4], "fp8", CPU)
    engine.compress(PROMPT, "cachegen", CPU)
    job = engine.run(engine.schedule("decompress", PROMPT, "cachegen", CPU))
    assert (job.outcome.chunks_done, job.outcome.chunks_skipped) == (2, 1)
    methods = [engine.tier(CPU).load(k)[1].method for k in keys]  # type: ignore[union-attr]
    assert methods == ["fp8", None, None]
    assert engine.decompress(PROMPT, "fp8", CPU) == 10
