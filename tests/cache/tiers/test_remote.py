"""RemoteBackend against a real redis-server: what one engine saves, a fresh engine reads.

Engines here are two workers of one layout (or of different ones), sharing a
store; the server is this module's own (`tests/redis_servers.py`).
"""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import redis
import torch

from lmc_connector import launch
from lmc_connector.cache import CacheEngine, ChunkLayout
from lmc_connector.cache.tiers.remote import RemoteBackend
from lmc_connector.cache.tiers.remote import tier as tier_module
from lmc_connector.cache.tiers.remote import writer as writer_module
from lmc_connector.cache.tiers.remote.values import Assembler
from lmc_connector.config import load_config
from lmc_connector.launch import Service
from lmc_connector.ops.codecs import fit_calibration
from tests.cache.conftest import CHUNK, LAYOUT, RecordingSink, make_kv
from tests.control.harness import wait_until
from tests.one_core import on_one_core

REMOTE = "RemoteBackend"
CPU = "LocalCPUBackend"
TOKENS = list(range(3 * CHUNK + 2))  # three full chunks and a partial one

Factory = Callable[..., CacheEngine]


@pytest.fixture
def make(redis_server: Service, store: redis.Redis) -> Iterator[Factory]:
    """Build opened engines on the module's server (or `url`); closed at teardown."""
    engines: list[CacheEngine] = []

    def build(layout: ChunkLayout = LAYOUT, url: str | None = None, **extra: object) -> CacheEngine:
        values = {"chunk_size": layout.chunk_size, "remote_url": url or redis_server.url, **extra}
        engine = CacheEngine(load_config(values, env={}), layout)
        engine.open()
        engines.append(engine)
        return engine

    yield build
    for engine in engines:
        engine.close()


def remote(engine: CacheEngine) -> RemoteBackend:
    tier = engine.tier(REMOTE)
    assert isinstance(tier, RemoteBackend)
    return tier


def save_prompt(
    engine: CacheEngine, tokens: list[int] = TOKENS, seed: int = 0
) -> list[torch.Tensor]:
    """Put every chunk of `tokens` as vLLM's save path does, and wait for the uploads."""
    kvs = []
    for i, key in enumerate(engine.hashes(tokens)):
        kv = make_kv(min(CHUNK, len(tokens) - i * CHUNK), seed + i)
        assert engine.put(key, kv)
        kvs.append(kv)
    remote(engine).flush()
    return kvs


def test_a_fresh_engine_loads_what_another_saved_bit_identical(make: Factory) -> None:
    writer, reader = make(), make()
    kvs = save_prompt(writer)
    assert reader.lookup(TOKENS, [CPU]) == 0
    assert reader.lookup(TOKENS) == len(TOKENS)
    loaded = reader.get(reader.hashes(TOKENS))
    assert len(loaded) == len(kvs)
    assert all(torch.equal(a, b) for a, b in zip(loaded, kvs, strict=True))
    # What came from the store was promoted into the reader's CPU tier.
    assert reader.lookup(TOKENS, [CPU]) == len(TOKENS)


def test_two_writers_of_one_chunk_never_mix_their_pieces(
    make: Factory, store: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second, reader = make(), make(), make()
    kvs = save_prompt(first)
    # The race: `second` asked which chunks the store lacks before `first`'s landed (a
    # window too narrow to hit at will, so its answer is faked), then uploads other bytes.
    monkeypatch.setattr(tier_module.ops, "exists", lambda client, heads: [False] * len(heads))
    save_prompt(second, seed=50)
    monkeypatch.undo()
    loaded = reader.get(reader.hashes(TOKENS))
    assert all(torch.equal(a, b) for a, b in zip(loaded, kvs, strict=True))
    assert len(loaded) == len(kvs)
    assert not list(store.scan_iter(match="*:s*"))  # the loser's staged pieces are gone


def test_a_stalled_assembly_is_a_miss_and_the_value_stays_in_the_store(
    make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This process's own assembly thread cannot be stalled on demand: the test slows
    `Assembler.add` (a fake) and shortens the wait for it."""
    writer, reader = make(), make()
    kvs = save_prompt(writer)
    monkeypatch.setattr(tier_module, "ASSEMBLY_TIMEOUT_S", 0.2)
    monkeypatch.setattr(tier_module, "_cores_here", lambda: 2)  # assemble on the thread
    add = Assembler.add

    def stalled(self: Assembler, pieces: list[bytes | None]) -> None:
        time.sleep(1.0)
        add(self, pieces)

    monkeypatch.setattr(Assembler, "add", stalled)
    assert reader.get(reader.hashes(TOKENS)) == []
    monkeypatch.setattr(Assembler, "add", add)
    monkeypatch.setattr(tier_module, "ASSEMBLY_TIMEOUT_S", 30.0)  # past the stalled one
    loaded = reader.get(reader.hashes(TOKENS))
    assert len(loaded) == len(kvs)
    assert all(torch.equal(a, b) for a, b in zip(loaded, kvs, strict=True))


@pytest.mark.parametrize("serde", ["fp8", "cachegen"])
def test_codec_serde_stores_fewer_bytes_and_loads_within_tolerance(
    make: Factory, store: redis.Redis, serde: str
) -> None:
    layout = ChunkLayout("m", 1, 0, "float16", 2, 4, 64, 64)
    tokens = list(range(128))
    writer, reader = make(layout, remote_serde=serde), make(layout)
    kvs = []
    for i, key in enumerate(writer.hashes(tokens)):
        kv = (torch.randn(layout.shape(64), generator=torch.Generator().manual_seed(i))).half()
        writer.put(key, kv)
        kvs.append(kv)
    remote(writer).flush()
    stored = sum(store.memory_usage(k) or 0 for k in store.scan_iter("lmc:*"))
    assert stored < sum(kv.numel() * 2 for kv in kvs) * 0.75
    loaded = reader.get(reader.hashes(tokens))
    assert len(loaded) == 2
    for got, want in zip(loaded, kvs, strict=True):
        error = (got.float() - want.float()).norm() / want.float().norm()
        assert 0 < error < 0.25


def test_encoded_values_are_read_into_memory_the_tier_is_given(
    make: Factory, store: redis.Redis
) -> None:
    """The reader's CPU tier hands out memory it touched at start-up (`cache/slabs.py`): a
    blob read back is a read-only view of what `allocate` gave, holding the stored bytes."""
    layout = ChunkLayout("m", 1, 0, "float16", 2, 4, 64, 64)
    tokens = list(range(128))
    writer, reader = make(layout, remote_serde="fp8"), make(layout)
    keys = writer.hashes(tokens)
    for i, key in enumerate(keys):
        writer.put(
            key, torch.randn(layout.shape(64), generator=torch.Generator().manual_seed(i)).half()
        )
    remote(writer).flush()
    given: list[torch.Tensor] = []

    def allocate(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        given.append(torch.empty(shape, dtype=dtype))
        return given[-1]

    remote(reader).allocate = allocate
    assert len(reader.get(keys)) == 2
    for key, memory in zip(keys, given, strict=True):
        blob = reader.tier(CPU).load(key)[1].blob  # type: ignore[union-attr]
        assert isinstance(blob, memoryview) and blob.readonly
        assert memory.dtype == torch.uint8 and memory.shape == (len(blob),)
        assert np.frombuffer(blob, dtype=np.uint8).ctypes.data == memory.data_ptr()
        assert bytes(blob) == store.get(f"{remote(reader).keys.head(key)}:0")


def test_keys_name_the_layout_and_the_chunk_so_other_layouts_never_meet(
    make: Factory, store: redis.Redis
) -> None:
    writer = make()
    save_prompt(writer)
    names = sorted(k.decode() for k in store.scan_iter("*"))
    fingerprint = LAYOUT.fingerprint()
    heads = [f"lmc:{fingerprint}:{{{k:016x}}}" for k in writer.hashes(TOKENS)]
    assert names == sorted([*heads, *(f"{head}:0" for head in heads)])  # a head, one piece
    other_rank = ChunkLayout(**{**_fields(LAYOUT), "rank": 1, "world_size": 2})
    other_model = ChunkLayout(**{**_fields(LAYOUT), "model": "other"})
    assert make(other_rank).lookup(TOKENS) == 0
    assert make(other_model).lookup(TOKENS) == 0


def _fields(layout: ChunkLayout) -> dict[str, Any]:
    return {name: getattr(layout, name) for name in layout.__slots__}


def test_what_the_store_has_is_not_uploaded_again(make: Factory, store: redis.Redis) -> None:
    save_prompt(make())
    writes = store.info("commandstats")["cmdstat_set"]["calls"]
    again = make()
    save_prompt(again)
    assert store.info("commandstats")["cmdstat_set"]["calls"] == writes
    # Chunks this engine did not write are not shown as its own.
    assert remote(again).chunk_keys() == []


def test_uploads_and_removals_are_chunk_events_of_the_remote_location(make: Factory) -> None:
    engine = make()
    sink = RecordingSink()
    engine.subscribe(sink)
    save_prompt(engine)
    keys = engine.hashes(TOKENS)
    assert [(e, k) for e, loc, k in sink.events if loc == REMOTE] == [("admit", k) for k in keys]
    assert sorted(remote(engine).chunk_keys()) == sorted(keys)
    assert engine.remove(TOKENS, [REMOTE]) == len(keys)
    assert [e for e, loc, _ in sink.events if loc == REMOTE].count("evict") == len(keys)
    assert engine.lookup(TOKENS, [REMOTE]) == 0


def test_the_written_record_keeps_the_newest_chunks_and_their_bytes(
    make: Factory, store: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("lmc_connector.cache.tiers.remote.tier.MAX_WRITTEN", 2)
    engine = make()
    sink = RecordingSink()
    engine.subscribe(sink)
    save_prompt(engine)
    keys = engine.hashes(TOKENS)
    assert sorted(remote(engine).chunk_keys()) == sorted(keys[-2:])
    forgotten = [k for e, loc, k in sink.events if loc == REMOTE and e == "evict"]
    assert sorted(forgotten) == sorted(keys[:-2])
    heads = [remote(engine).keys.head(k) for k in keys[-2:]]
    stored = sum(store.strlen(n) for h in heads for n in store.scan_iter(f"{h}*"))
    assert engine.usage()[REMOTE].used_bytes == stored
    assert engine.usage()[REMOTE].chunks == 2


def test_a_corrupted_value_is_a_miss_and_is_removed(make: Factory, store: redis.Redis) -> None:
    save_prompt(make())
    reader = make()
    keys = reader.hashes(TOKENS)
    second = remote(reader).keys.head(keys[1])
    piece = bytearray(cast("bytes | None", store.get(f"{second}:0")) or b"")
    piece[5] ^= 0xFF
    store.set(f"{second}:0", bytes(piece))
    assert len(reader.get(keys)) == 1  # the first chunk only: a miss from the second on
    assert not store.exists(second)
    assert reader.lookup(TOKENS) == CHUNK


def test_a_foreign_value_under_a_chunk_name_is_a_miss_and_is_removed(
    make: Factory, store: redis.Redis
) -> None:
    reader = make()
    first, second = (remote(reader).keys.head(k) for k in reader.hashes(TOKENS)[:2])
    store.set(first, b"not a chunk")
    store.hset(second, "not", "a string")
    assert reader.get(reader.hashes(TOKENS)) == []
    assert reader.get(reader.hashes(TOKENS)[1:]) == []
    assert not store.exists(first) and not store.exists(second)


def test_a_chunk_evicted_between_lookup_and_load_is_a_short_load(
    make: Factory, store: redis.Redis
) -> None:
    save_prompt(make())
    reader = make()
    keys = reader.hashes(TOKENS)
    assert reader.lookup(TOKENS) == len(TOKENS)
    third = remote(reader).keys.head(keys[2])
    store.unlink(f"{third}:0")  # Redis's LRU eviction took one piece of the third chunk
    assert len(reader.get(keys)) == 2
    assert not store.exists(third)  # what was left of it is gone too
    assert reader.lookup(TOKENS, [REMOTE]) == 2 * CHUNK


def test_clear_unlinks_only_this_layouts_chunks_and_keeps_pinned_ones(
    make: Factory, store: redis.Redis
) -> None:
    engine = make()
    save_prompt(engine)
    other = make(ChunkLayout(**{**_fields(LAYOUT), "model": "other"}))
    save_prompt(other)
    store.set("user:data", b"not ours")
    pinned = engine.hashes(TOKENS)[0]
    engine.pin_keys([pinned])
    assert engine.clear(REMOTE)[:2] == (len(engine.hashes(TOKENS)) - 1, 1)
    assert engine.lookup(TOKENS, [REMOTE]) == CHUNK
    assert other.lookup(TOKENS, [REMOTE]) == len(TOKENS)
    assert store.get("user:data") == b"not ours"


def test_a_clear_in_many_batches_reports_each_chunk_gone_once(
    make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tier_module.ops, "CLEAR_BATCH", 3)  # names per UNLINK round trip
    engine = make()
    sink = RecordingSink()
    save_prompt(engine)
    engine.subscribe(sink)
    chunks = len(engine.hashes(TOKENS))
    assert engine.clear(REMOTE)[:2] == (chunks, 0)
    assert sorted(k for kind, where, k in sink.events if (kind, where) == ("evict", REMOTE)) == (
        sorted(engine.hashes(TOKENS))
    )
    assert engine.lookup(TOKENS, [REMOTE]) == 0


def test_a_cache_reset_leaves_the_shared_store_alone_unless_asked(make: Factory) -> None:
    one, other = make(), make()
    save_prompt(one)
    assert one.reset() > 0
    assert other.lookup(TOKENS) == len(TOKENS)  # from the store: the other instances keep it
    assert one.reset(shared=True) > 0
    assert other.lookup(TOKENS) == 0


def test_a_full_store_that_does_not_evict_refuses_uploads_but_stays_in_use(
    make: Factory, store: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    save_prompt(make())
    policy = str(store.config_get("maxmemory-policy")["maxmemory-policy"])
    store.config_set("maxmemory-policy", "noeviction")
    store.config_set("maxmemory", str(store.info("memory")["used_memory"]))  # full from now
    try:
        with caplog.at_level(logging.WARNING):
            engine = make()
            save_prompt(engine, list(range(500, 500 + 2 * CHUNK)), seed=7)
            assert remote(engine).writer.counts.dropped_failed == 2
            assert engine.lookup(TOKENS) == len(TOKENS)  # the store still answers lookups
    finally:
        store.config_set("maxmemory", "0")
        store.config_set("maxmemory-policy", policy)
    assert "maxmemory-policy is noeviction" in caplog.text
    assert "upload refused by the store" in caplog.text
    assert "the store is full and does not evict: start it with --maxmemory-policy allkeys-lru" in (
        caplog.text
    )


def test_compress_and_decompress_re_encode_stored_values_in_place(
    make: Factory, store: redis.Redis
) -> None:
    engine = make()
    kvs = save_prompt(engine)
    before = sum(store.memory_usage(k) or 0 for k in store.scan_iter("lmc:*"))
    assert engine.compress(TOKENS, "fp8", REMOTE) == len(TOKENS)
    assert sum(store.memory_usage(k) or 0 for k in store.scan_iter("lmc:*")) < before
    reader = make()
    lossy = reader.get(reader.hashes(TOKENS))
    assert len(lossy) == len(kvs) and not torch.equal(lossy[0], kvs[0])
    assert all(torch.allclose(a, b, atol=0.2) for a, b in zip(lossy, kvs, strict=True))
    assert engine.decompress(TOKENS, "fp8", REMOTE) == len(TOKENS)
    heads = [store.get(remote(engine).keys.head(k)) or b"" for k in engine.hashes(TOKENS)]
    assert all(b"float16" in head for head in heads)
    assert not list(store.scan_iter("*:s*"))  # nothing staged is left behind


def test_move_to_the_store_and_back(make: Factory) -> None:
    engine = make()
    kvs = save_prompt(engine)
    assert engine.remove(TOKENS, [REMOTE]) == 4
    assert engine.move(TOKENS, CPU, REMOTE) == len(TOKENS)
    assert engine.lookup(TOKENS, [CPU]) == 0
    assert engine.move(TOKENS, REMOTE, CPU) == len(TOKENS)
    assert engine.lookup(TOKENS, [REMOTE]) == 0
    loaded = engine.get(engine.hashes(TOKENS))
    assert all(torch.equal(a, b) for a, b in zip(loaded, kvs, strict=True))


def test_a_full_upload_queue_drops_and_counts_without_blocking(
    redis_server: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_module, "MAX_QUEUED_CHUNKS", 2)
    config = load_config({"chunk_size": CHUNK, "remote_url": redis_server.url}, env={})
    engine = CacheEngine(config, LAYOUT)  # not opened: no writer thread drains the queue
    for i, key in enumerate(engine.hashes(TOKENS)):
        assert engine.put(key, make_kv(CHUNK, i))
    assert remote(engine).writer.counts.dropped_full == 2
    assert engine.lookup(TOKENS, [CPU]) == len(TOKENS)


def test_password_protected_store(
    tmp_path: Path, make: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    with launch.running_redis(tmp_path, args=("--requirepass", "s3cret")) as server:
        port = server.url.rsplit(":", 1)[1]
        writer = make(url=f"redis://:s3cret@127.0.0.1:{port}/2")
        save_prompt(writer)
        assert make(url=f"valkey://:s3cret@127.0.0.1:{port}/2").lookup(TOKENS) == len(TOKENS)
        assert make(url=f"redis://:s3cret@127.0.0.1:{port}/3").lookup(TOKENS) == 0
        wrong = make(url=f"redis://:wrong@127.0.0.1:{port}/2")
        with caplog.at_level(logging.WARNING):
            assert wrong.lookup(TOKENS) == 0  # refused: a miss, logged, never raised
        assert "check the user and password in remote_url" in caplog.text
        assert "wrong" not in caplog.text


def test_a_dead_store_is_a_miss_and_uploads_resume_when_it_is_back(tmp_path: Path) -> None:
    port = launch.free_port()
    config = load_config({"chunk_size": CHUNK, "remote_url": f"redis://127.0.0.1:{port}"}, env={})
    with launch.running_redis(tmp_path / "a", port):
        engine = CacheEngine(config, LAYOUT)
        engine.open()
        save_prompt(engine)
    try:
        # The server is gone: lookups answer from the local tiers only, puts never block.
        reader = CacheEngine(config, LAYOUT)
        reader.open()
        started = time.monotonic()
        assert reader.lookup(TOKENS) == 0
        assert reader.get(reader.hashes(TOKENS)) == []
        for i, key in enumerate(reader.hashes(list(range(100, 120)))):
            assert reader.put(key, make_kv(CHUNK, i))
        assert time.monotonic() - started < 5
        assert engine.lookup(TOKENS) == len(TOKENS)  # its own CPU tier still serves
        with launch.running_redis(tmp_path / "b", port):
            attempts = itertools.count(1)

            def uploaded() -> bool:
                tokens = [1000 * next(attempts) + t for t in range(2 * CHUNK)]
                save_prompt(engine, tokens)
                return engine.lookup(tokens, [REMOTE]) == len(tokens)

            wait_until(uploaded, timeout=15, what="uploads to resume")
    finally:
        engine.close()
        reader.close()


def test_chunks_spread_over_a_redis_cluster(redis_cluster: list[Service], make: Factory) -> None:
    from tests.redis_servers import cluster_url

    url = cluster_url(redis_cluster)
    tokens = list(range(40 * CHUNK))
    writer = make(url=url)
    kvs = save_prompt(writer, tokens)
    sizes = [redis.Redis.from_url(n.url).dbsize() for n in redis_cluster]
    assert sum(sizes) == 2 * 40 and all(size > 0 for size in sizes)  # a head and a piece each
    reader = make(url=url)
    assert reader.lookup(tokens) == len(tokens)
    loaded = reader.get(reader.hashes(tokens))
    assert all(torch.equal(a, b) for a, b in zip(loaded, kvs, strict=True))
    assert reader.clear(REMOTE)[:2] == (40, 0)  # chunks another engine wrote too
    assert sum(redis.Redis.from_url(n.url).dbsize() for n in redis_cluster) == 0


BIG = ChunkLayout("big", 1, 0, "float16", 2, 4, 1024, 128)  # 2 MiB chunks: three pieces
BIG_TOKENS = list(range(2 * 128))


def save_big_chunks(writer: CacheEngine) -> list[torch.Tensor]:
    """Two 2 MiB chunks of BIG_TOKENS, uploaded."""
    kvs = [torch.randn(BIG.shape(128), generator=torch.Generator().manual_seed(i)).half()
           for i in range(2)]  # fmt: skip
    for key, kv in zip(writer.hashes(BIG_TOKENS), kvs, strict=True):
        writer.put(key, kv)
    remote(writer).flush()
    return kvs


def test_chunks_over_a_mebibyte_travel_in_pieces_and_come_back_whole(
    make: Factory, store: redis.Redis
) -> None:
    tokens = BIG_TOKENS
    writer, reader = make(BIG), make(BIG)
    kvs = save_big_chunks(writer)
    head = remote(writer).keys.head(writer.hashes(tokens)[0])
    assert [store.strlen(f"{head}:{i}") for i in range(4)] == [(1 << 20) - 64] * 2 + [128, 0]
    loaded = reader.get(reader.hashes(tokens))
    assert all(torch.equal(a, b) for a, b in zip(loaded, kvs, strict=True))


ONE_CORE = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux affinity")


@ONE_CORE
def test_a_reader_bound_to_one_core_assembles_pieces_itself(make: Factory) -> None:
    """No hand-off to the assembly thread, the same chunks."""
    writer, reader = make(BIG), make(BIG)
    kvs = save_big_chunks(writer)
    loaded = on_one_core(lambda: reader.get(reader.hashes(BIG_TOKENS)))
    assert all(torch.equal(a, b) for a, b in zip(loaded, kvs, strict=True)) and len(loaded) == 2
    assert not [t for t in threading.enumerate() if t.name.startswith("lmc-store-assembly")]


@ONE_CORE
def test_on_one_core_a_damaged_piece_is_still_a_miss_and_is_removed(
    make: Factory, store: redis.Redis
) -> None:
    writer, reader = make(BIG), make(BIG)
    save_big_chunks(writer)
    keys = reader.hashes(BIG_TOKENS)
    second = remote(reader).keys.head(keys[1])
    piece = bytearray(cast("bytes | None", store.get(f"{second}:1")) or b"")
    piece[5] ^= 0xFF
    store.set(f"{second}:1", bytes(piece))
    assert len(on_one_core(lambda: reader.get(keys))) == 1
    assert not store.exists(second)


def make_certificates(folder: Path) -> dict[str, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 (openssl's command line)."""
    files = {n: folder / f"{n}.pem" for n in ("ca", "ca-key", "server", "server-key", "csr")}
    san = folder / "san.cnf"
    san.write_text("subjectAltName=IP:127.0.0.1\n")
    steps = [
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", files["ca-key"], "-out",
         files["ca"], "-days", "1", "-subj", "/CN=lmc-test-ca"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", files["server-key"], "-out",
         files["csr"], "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", files["csr"], "-CA", files["ca"], "-CAkey", files["ca-key"],
         "-CAcreateserial", "-out", files["server"], "-days", "1", "-extfile", san],
    ]  # fmt: skip
    for step in steps:
        subprocess.run(["openssl", *map(str, step)], check=True, capture_output=True)
    return files


def test_tls_store_with_a_password(tmp_path: Path, make: Factory) -> None:
    certs = make_certificates(tmp_path)
    tls_port = launch.free_port()
    args = ("--tls-port", str(tls_port), "--tls-cert-file", str(certs["server"]),
            "--tls-key-file", str(certs["server-key"]), "--tls-ca-cert-file", str(certs["ca"]),
            "--tls-auth-clients", "no", "--requirepass", "pw")  # fmt: skip
    with launch.running_redis(tmp_path / "redis", args=args):
        url = f"rediss://:pw@127.0.0.1:{tls_port}?ssl_ca_certs={certs['ca']}"
        save_prompt(make(url=url))
        assert make(url=url).lookup(TOKENS) == len(TOKENS)
        # Plain text to the TLS port, or TLS without trusting the CA: misses, never errors.
        assert make(url=f"redis://:pw@127.0.0.1:{tls_port}").lookup(TOKENS) == 0
        assert make(url=f"rediss://:pw@127.0.0.1:{tls_port}").lookup(TOKENS) == 0


def test_a_calibration_in_the_store_lets_other_engines_decode_kvtc_values(
    make: Factory, store: redis.Redis
) -> None:
    layout = ChunkLayout("m", 1, 0, "float16", 2, 4, 64, 64)

    def kv(seed: int) -> torch.Tensor:
        return torch.randn(layout.shape(64), generator=torch.Generator().manual_seed(seed)).half()

    writer, early_reader = make(layout, remote_serde="kvtc"), make(layout)
    before, after = list(range(128)), list(range(500, 628))
    for i, key in enumerate(writer.hashes(before)):
        writer.put(key, kv(i))  # no calibration yet: uploaded plain
    remote(writer).flush()
    assert [f.method for f in remote(writer).forms(writer.hashes(before)) if f] == [None, None]

    calibration = writer.calibrations.adopt(
        "kvtc", fit_calibration("kvtc", [kv(100 + s) for s in range(3)])
    )
    kvs = [kv(10 + i) for i in range(2)]
    for key, value in zip(writer.hashes(after), kvs, strict=True):
        writer.put(key, value)
    remote(writer).flush()
    assert [f.method for f in remote(writer).forms(writer.hashes(after)) if f] == ["kvtc"] * 2

    late_reader = make(layout)  # opened after the calibration: encodes with it too
    assert late_reader.calibrations.current_ids() == {"kvtc": calibration.id}
    assert early_reader.calibrations.current_ids() == {}
    for reader in (early_reader, late_reader):  # both find it in the store to decode
        loaded = reader.get(reader.hashes(after))
        assert len(loaded) == 2
        for got, want in zip(loaded, kvs, strict=True):
            assert float((got.float() - want.float()).norm() / want.float().norm()) < 0.2
    early_reader.clear(REMOTE)
    assert store.exists(f"lmc:{layout.fingerprint()}:calibration:kvtc")  # not a chunk


KVTC_LAYOUT = ChunkLayout("m", 1, 0, "float16", 2, 4, 64, 64)


def kvtc_kv(seed: int) -> torch.Tensor:
    shape = KVTC_LAYOUT.shape(64)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).half()


def calibrated_writer(make: Factory) -> CacheEngine:
    writer = make(KVTC_LAYOUT, remote_serde="kvtc")
    samples = [kvtc_kv(100 + s) for s in range(3)]
    writer.calibrations.adopt("kvtc", fit_calibration("kvtc", samples))
    return writer


def drop_calibrations(store: redis.Redis) -> int:
    """What the store's eviction does to calibrations nobody read for a while."""
    names = list(store.scan_iter(match=f"lmc:{KVTC_LAYOUT.fingerprint()}:calibration:*"))
    return int(store.unlink(*names)) if names else 0


def test_a_calibration_the_store_lost_is_written_again_by_an_instance_encoding_with_it(
    make: Factory, store: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmc_connector.cache import calibrations

    monkeypatch.setattr(calibrations, "SHELF_CHECK_S", 0.0)
    writer = calibrated_writer(make)
    assert drop_calibrations(store) > 0
    tokens = list(range(900, 1028))
    kvs = [kvtc_kv(i) for i in range(2)]
    for key, kv in zip(writer.hashes(tokens), kvs, strict=True):
        writer.put(key, kv)
    remote(writer).flush()
    reader = make(KVTC_LAYOUT)
    loaded = reader.get(reader.hashes(tokens))
    assert len(loaded) == 2  # decoded: the calibration is back in the store


def test_a_store_value_no_instance_can_decode_is_removed_from_the_store(
    make: Factory, store: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmc_connector.cache import calibrations

    monkeypatch.setattr(calibrations, "SHELF_CHECK_S", 3600.0)  # no rewrite in this test
    writer = calibrated_writer(make)
    tokens = list(range(900, 964))
    (key,) = writer.hashes(tokens)
    writer.put(key, kvtc_kv(1))
    remote(writer).flush()
    assert drop_calibrations(store) > 0
    reader = make(KVTC_LAYOUT)
    assert reader.lookup(tokens) == len(tokens)  # the value is there...
    assert reader.get([key]) == []  # ...but decodes nowhere: a miss
    assert reader.lookup(tokens) == 0  # and it is gone from the store, for every instance
    assert not remote(reader).held([key])[0]
