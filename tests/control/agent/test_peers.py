"""The peer channel between two instances, with real sockets and a real controller.

Instances A and B have two tensor-parallel ranks each (in-process workers); each rank of A
holds KV of its own (a different seed per rank), so a rank that fetched from the wrong rank
of A would hold the other rank's tensors. B finds A through the controller's locate
socket, as vLLM's scheduler does, and every rank of B fetches from the address of its rank.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from lmc_connector.control.agent.peer_client import PeerUnavailableError
from lmc_connector.launch import free_port
from lmc_connector.tokens import ChunkKey
from lmc_connector.v1.metadata import LoadSpec
from lmc_connector.v1.peers import PeerLoads, PeerLocator
from tests.control.conftest import InstanceFactory, new_controller
from tests.control.harness import CPU, Controller, Worker, engine_config, registered, wait_until

TOKENS = list(range(1000, 1030))  # chunks of 4 tokens: 7 full chunks and one of 2
CHUNKS = 8


@pytest.fixture(scope="module")
def peer_controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Controller]:
    ctl = new_controller(tmp_path_factory.mktemp("peers"), "--reply-port", str(free_port()))
    ctl.start()
    yield ctl
    ctl.stop()


def reply_port(ctl: Controller) -> int:
    return int(ctl.args[ctl.args.index("--reply-port") + 1])


def p2p(ctl: Controller) -> dict[str, Any]:
    """Config keys of an instance that serves and fetches peers (`make_instance` picks the
    peer ports with the command ports)."""
    return {
        "enable_p2p": True,
        "controller_reply_url": f"127.0.0.1:{reply_port(ctl)}",
        "p2p_init_ports": [],
        "p2p_timeout_ms": 1000,
    }


def fill_per_rank(workers: list[Worker], tokens: list[int]) -> None:
    for worker in workers:
        worker.fill(tokens, seed=100 + worker.engine.layout.rank)


def plain(worker: Worker, tokens: list[int]) -> list[torch.Tensor]:
    return [c.kv for c in worker.engine.stored(worker.engine.hashes(tokens))]


def locator(ctl: Controller, instance_id: str) -> PeerLocator:
    keys = {**p2p(ctl), "p2p_init_ports": [free_port()]}
    config = engine_config(ctl.monitor_port, instance_id, [free_port()], **keys)
    found = PeerLocator(config)
    found.start()
    return found


@pytest.fixture
def pair(
    make_instance: InstanceFactory, peer_controller: Controller, request: pytest.FixtureRequest
) -> tuple[list[Worker], list[Worker]]:
    """Instances A (holding TOKENS, KV per rank) and B (empty), both serving peers."""
    name = request.node.name[:40]
    a = make_instance(f"A-{name}", target=peer_controller, **p2p(peer_controller))
    b = make_instance(f"B-{name}", target=peer_controller, **p2p(peer_controller))
    fill_per_rank(a, TOKENS)
    wait_until(lambda: registered(peer_controller.url, f"A-{name}", 2, CHUNKS), what="A's chunks")
    return a, b


def test_each_rank_fetches_its_own_shard_from_the_same_rank(
    pair: tuple[list[Worker], list[Worker]], peer_controller: Controller
) -> None:
    a, b = pair
    b_id = b[0].engine.config.lmcache_instance_id
    found = locator(peer_controller, b_id).find(b[0].engine.hashes(TOKENS), 0)
    assert found is not None
    assert found.instance_id == a[0].engine.config.lmcache_instance_id
    assert found.chunks == CHUNKS
    assert found.addresses == [w.agent.spec.peer_address for w in a]
    for rank, worker in enumerate(b):
        assert worker.agent.peers is not None
        keys = worker.engine.hashes(TOKENS)
        for key, chunk in worker.agent.peers.fetch(found.addresses[rank], keys):
            assert worker.engine.admit(key, chunk)
    for rank in (0, 1):
        mine, theirs, other = (
            plain(b[rank], TOKENS),
            plain(a[rank], TOKENS),
            plain(a[1 - rank], TOKENS),
        )
        assert len(mine) == CHUNKS
        assert all(torch.equal(x, y) for x, y in zip(mine, theirs, strict=True))
        assert not any(torch.equal(x, y) for x, y in zip(mine, other, strict=True))


def test_compressed_chunks_travel_as_stored(pair: tuple[list[Worker], list[Worker]]) -> None:
    a, b = pair
    assert a[0].engine.compress(TOKENS, "cachegen", CPU) == len(TOKENS)
    sent = a[0].engine.stored(a[0].engine.hashes(TOKENS))
    assert b[0].agent.peers is not None
    got = list(
        b[0].agent.peers.fetch(a[0].agent.spec.peer_address or "", b[0].engine.hashes(TOKENS))
    )
    assert [c.method for _, c in got] == ["cachegen"] * CHUNKS
    assert [c.blob for _, c in got] == [c.blob for c in sent]


def test_fetch_ends_at_the_peers_first_missing_chunk(
    pair: tuple[list[Worker], list[Worker]],
) -> None:
    a, b = pair
    # A longer prompt: its 8th chunk holds other tokens than A's short last chunk.
    keys = b[1].engine.hashes([*TOKENS, 7, 7, 7, 7, 7, 7])
    assert b[1].agent.peers is not None
    got = list(b[1].agent.peers.fetch(a[1].agent.spec.peer_address or "", keys))
    assert [k for k, _ in got] == keys[: CHUNKS - 1]


def test_an_instance_of_another_layout_is_never_named_and_refused_if_asked(
    pair: tuple[list[Worker], list[Worker]],
    make_instance: InstanceFactory,
    peer_controller: Controller,
) -> None:
    a, _ = pair
    other = make_instance("other-layout", world_size=2, chunk_size=2, target=peer_controller,
                          **p2p(peer_controller))  # fmt: skip
    assert locator(peer_controller, "other-layout").find(other[0].engine.hashes(TOKENS), 0) is None
    assert other[0].agent.peers is not None
    with pytest.raises(PeerUnavailableError, match="layout"):
        list(
            other[0].agent.peers.fetch(
                a[0].agent.spec.peer_address or "", other[0].engine.hashes(TOKENS)
            )
        )


def test_a_dead_peer_is_a_miss_within_the_timeout(pair: tuple[list[Worker], list[Worker]]) -> None:
    _, b = pair
    assert b[0].agent.peers is not None
    started = time.monotonic()
    with pytest.raises(PeerUnavailableError):
        list(b[0].agent.peers.fetch(f"tcp://127.0.0.1:{free_port()}", b[0].engine.hashes(TOKENS)))
    assert time.monotonic() - started < 3.0  # p2p_timeout_ms is 1000


def test_a_silent_controller_is_a_miss_and_is_not_asked_again_at_once(
    peer_controller: Controller,
) -> None:
    keys = {
        **p2p(peer_controller),
        "controller_reply_url": f"127.0.0.1:{free_port()}",
        "p2p_init_ports": [free_port()],
    }
    config = engine_config(
        peer_controller.monitor_port, "nobody", [free_port()], lookup_timeout_ms=200, **keys
    )
    silent = PeerLocator(config)
    silent.start()
    try:
        assert silent.find([ChunkKey(1), ChunkKey(2), ChunkKey(3)], 0) is None
        started = time.monotonic()
        assert silent.find([ChunkKey(1), ChunkKey(2), ChunkKey(3)], 0) is None
        assert time.monotonic() - started < 0.05
        assert silent.asked == 1
    finally:
        silent.close()


def test_async_load_admits_the_missing_chunks_pinned_until_released(
    pair: tuple[list[Worker], list[Worker]],
) -> None:
    a, b = pair
    engine, client = b[1].engine, b[1].agent.peers
    assert client is not None
    keys = engine.hashes(TOKENS)
    loads = PeerLoads(engine, client, rank=1)
    try:
        spec = LoadSpec(
            "req", keys, 0, 0, len(TOKENS) - 1, [], [w.agent.spec.peer_address or "" for w in a]
        )
        loads.submit(spec)
        finished = wait_until(loads.take_finished, what="the fetch")
        assert finished == [spec]
        assert engine.lookup(TOKENS) == len(TOKENS)
        assert all(engine.is_pinned(k) for k in keys)
        loads.release("req")
        assert not any(engine.is_pinned(k) for k in keys)
        assert all(
            torch.equal(x, y) for x, y in zip(plain(b[1], TOKENS), plain(a[1], TOKENS), strict=True)
        )
    finally:
        loads.close()


def test_peer_server_sends_plain_chunks_without_copying_them(
    pair: tuple[list[Worker], list[Worker]],
) -> None:
    from lmc_connector.cache.record import payload

    a, _ = pair
    chunk = a[0].engine.stored(a[0].engine.hashes(TOKENS))[0]
    assert chunk.kv is not None
    view = payload(chunk)
    assert isinstance(view, memoryview)
    assert view.nbytes == chunk.nbytes
    assert torch.frombuffer(view, dtype=torch.uint8).data_ptr() == chunk.kv.data_ptr()


def test_an_instance_that_failed_a_fetch_is_not_named_for_a_while(
    pair: tuple[list[Worker], list[Worker]], peer_controller: Controller
) -> None:
    a, b = pair
    keys = b[0].engine.hashes(TOKENS)
    asking = locator(peer_controller, b[0].engine.config.lmcache_instance_id)
    try:
        assert asking.find(keys, 0) is not None
        asking.avoid(a[0].engine.config.lmcache_instance_id)
        assert asking.find(keys, 0) is None
    finally:
        asking.close()


def test_a_reply_carries_at_most_its_byte_budget_of_leading_chunks(
    pair: tuple[list[Worker], list[Worker]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmc_connector.control.agent import peer_server

    a, b = pair
    keys = b[0].engine.hashes(TOKENS)
    chunk_bytes = plain(a[0], TOKENS)[0].nbytes
    monkeypatch.setattr(peer_server, "MAX_REPLY_BYTES", 3 * chunk_bytes)
    assert b[0].agent.peers is not None
    got = list(b[0].agent.peers.fetch(a[0].agent.spec.peer_address or "", keys))
    assert [k for k, _ in got] == keys[:3]


def test_chunks_larger_than_a_peer_message_stop_start_up_with_the_fix(
    make_instance: InstanceFactory, peer_controller: Controller, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmc_connector.config import ConfigError
    from lmc_connector.control.agent import agent

    monkeypatch.setattr(agent, "MAX_MESSAGE_BYTES", 64)
    with pytest.raises(ConfigError, match=r"more than the peer channel's .*lower chunk_size"):
        make_instance("big-chunks", world_size=1, target=peer_controller, **p2p(peer_controller))
