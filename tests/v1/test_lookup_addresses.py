"""How the scheduler reaches each worker's lookup server: IPC on its host, TCP on another,
never a socket another server holds. Real lookup servers and CPU engines."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmc_connector.cache import CacheEngine
from lmc_connector.config import load_config
from lmc_connector.control.wire.security import ChannelSecurity
from lmc_connector.tokens import chunk_hashes
from lmc_connector.v1.lookup import LookupClient, LookupServer, PinRegistry
from lmc_connector.v1.lookup_addresses import LookupHandshake, host_identity, plan_addresses
from tests.cache.conftest import CHUNK, LAYOUT, put_prompt

PROMPT = list(range(3 * CHUNK))
ELSEWHERE = "another-node/boot"


@pytest.fixture
def engines() -> list[CacheEngine]:
    config = load_config({"chunk_size": CHUNK}, env={})
    return [CacheEngine(config, LAYOUT) for _ in range(2)]


@pytest.fixture
def servers() -> Iterator[list[LookupServer]]:
    started: list[LookupServer] = []
    yield started
    for server in started:
        server.close()


def serve(
    servers: list[LookupServer],
    address: str,
    engine: CacheEngine,
    tcp_host: str | None = None,
    security: ChannelSecurity | None = None,
) -> None:
    server = LookupServer(address, PinRegistry(engine), engine.reset, tcp_host, security)
    server.start()
    servers.append(server)


def ask(addresses: list[str | None], security: ChannelSecurity | None = None) -> int:
    """The scheduler's answer: the cached prefix on every rank it asks."""
    client = LookupClient(addresses, timeout_ms=2000, security=security)
    client.start()
    try:
        return client.lookup("r", chunk_hashes(PROMPT, CHUNK), len(PROMPT), pin=False).tokens
    finally:
        client.close()


def test_a_second_server_with_the_same_engine_id_is_refused(
    tmp_path: Path, engines: list[CacheEngine], servers: list[LookupServer]
) -> None:
    address = f"ipc://{tmp_path}/same.sock"
    put_prompt(engines[0], PROMPT)
    serve(servers, address, engines[0])
    with pytest.raises(RuntimeError, match="engine_id"):
        serve(servers, address, engines[1])
    assert ask([address]) == len(PROMPT)  # the first server still answers its own lookups


def test_a_stale_socket_file_is_taken_over(
    tmp_path: Path, engines: list[CacheEngine], servers: list[LookupServer]
) -> None:
    path = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens: a crashed server's leftover
    put_prompt(engines[0], PROMPT)
    serve(servers, f"ipc://{path}", engines[0])
    assert ask([f"ipc://{path}"]) == len(PROMPT)


def test_ranks_on_another_host_are_asked_over_tcp(
    tmp_path: Path, engines: list[CacheEngine], servers: list[LookupServer]
) -> None:
    put_prompt(engines[0], PROMPT)
    put_prompt(engines[1], PROMPT[: 2 * CHUNK])
    ipc = [f"ipc://{tmp_path}/r{r}.sock" for r in range(2)]
    serve(servers, ipc[0], engines[0])
    serve(servers, ipc[1], engines[1], tcp_host="127.0.0.1")
    tcp = servers[1].tcp_address
    assert tcp is not None and tcp.startswith("tcp://127.0.0.1:")
    shakes = {
        0: LookupHandshake(host_identity(), ipc[0]),
        1: LookupHandshake(ELSEWHERE, ipc[1], tcp),
    }
    planned = plan_addresses(ipc, shakes)
    assert planned == [ipc[0], tcp]
    assert ask(planned) == 2 * CHUNK  # rank 1's shorter prefix, answered over TCP


def test_a_remote_rank_without_tcp_is_not_asked(
    tmp_path: Path, engines: list[CacheEngine], servers: list[LookupServer]
) -> None:
    """Not asking beats waiting `lookup_timeout_ms` for an answer that cannot come."""
    put_prompt(engines[0], PROMPT)
    ipc = [f"ipc://{tmp_path}/r{r}.sock" for r in range(2)]
    serve(servers, ipc[0], engines[0])
    shakes = {0: LookupHandshake(host_identity(), ipc[0]), 1: LookupHandshake(ELSEWHERE, ipc[1])}
    planned = plan_addresses(ipc, shakes)
    assert planned == [ipc[0], None]
    assert ask(planned) == len(PROMPT)


def test_ranks_that_sent_no_handshake_keep_their_ipc_path() -> None:
    assert plan_addresses(["ipc://a", "ipc://b"], {}) == ["ipc://a", "ipc://b"]


def test_with_a_secret_only_its_holders_are_answered(
    tmp_path: Path, engines: list[CacheEngine], servers: list[LookupServer]
) -> None:
    """The TCP lookup endpoint may face the network once a secret guards it."""
    secret = ChannelSecurity(b"a lookup secret of enough length")
    put_prompt(engines[0], PROMPT)
    serve(servers, f"ipc://{tmp_path}/r0.sock", engines[0], "127.0.0.1", secret)
    tcp = servers[0].tcp_address
    assert ask([tcp], secret) == len(PROMPT)
    assert ask([tcp], ChannelSecurity(b"another secret of enough length")) == 0
    assert ask([tcp]) == 0  # no secret at all: silence, a miss
