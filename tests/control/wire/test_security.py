"""CURVE from one shared secret on real sockets: who gets through, who does not, and where a
channel without a secret may listen."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from lmc_connector.control.wire.rpc import Call, RpcClient, RpcServer, RpcTimeout
from lmc_connector.control.wire.security import (
    ChannelSecurity,
    InsecureBindError,
    SecretError,
    read_secret,
)
from tests.control.harness import wait_until

Context = zmq.Context[zmq.Socket[bytes]]
SECRET = b"0123456789abcdef-shared-by-the-fleet"


@pytest.fixture
def context() -> Iterator[Context]:
    ctx: Context = zmq.Context()
    yield ctx
    ctx.term()


class Counting:
    """A request handler that answers "ok" and counts what reached it."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, call: Call) -> None:
        self.calls += 1
        call.reply([b"ok"])


def serve(context: Context, security: ChannelSecurity, handler: Counting) -> RpcServer:
    server = RpcServer(context, "tcp://127.0.0.1:0", handler, "secured", security)
    server.start()
    return server


def ask(security: ChannelSecurity, address: str, timeout: float = 1.0) -> bytes | None:
    """One request from a client of its own context; None when nothing answers."""
    context: Context = zmq.Context()
    client = RpcClient(context, "asker", security)
    client.start()
    try:
        return client.call(address, [b"hello"], timeout)[0].bytes
    except RpcTimeout:
        return None
    finally:
        client.close()
        context.term()


def test_peers_holding_the_same_secret_talk(context: Context) -> None:
    handler = Counting()
    server = serve(context, ChannelSecurity(SECRET), handler)
    try:
        assert ask(ChannelSecurity(SECRET), server.endpoint, timeout=5) == b"ok"
    finally:
        server.close()


def test_a_peer_without_the_secret_reaches_nothing(context: Context) -> None:
    handler = Counting()
    server = serve(context, ChannelSecurity(SECRET), handler)
    try:
        assert ask(ChannelSecurity(b"another secret of enough length"), server.endpoint) is None
        assert ask(ChannelSecurity(), server.endpoint) is None  # no CURVE at all
        assert handler.calls == 0
        assert ask(ChannelSecurity(SECRET), server.endpoint, timeout=5) == b"ok"
    finally:
        server.close()


def test_knowing_the_servers_public_key_is_not_enough(context: Context) -> None:
    handler = Counting()
    security = ChannelSecurity(SECRET)
    server = serve(context, security, handler)
    client_context: Context = zmq.Context()
    dealer = client_context.socket(zmq.DEALER)
    public, secret = zmq.curve_keypair()  # a key pair of its own, not derived from the secret
    dealer.curve_publickey, dealer.curve_secretkey = public, secret
    dealer.curve_serverkey = security._server_public  # leaked: the ZAP handler still refuses
    try:
        dealer.connect(server.endpoint)
        dealer.send_multipart([b"\1\0\0\0\0\0\0\0", b"hello"])
        wait_until(lambda: security.refused >= 1, 5, "the ZAP handler to refuse the client")
        assert dealer.poll(300) == 0 and handler.calls == 0
    finally:
        dealer.close(linger=0)
        client_context.term()
        server.close()


def test_a_secured_server_ignores_raw_bytes_and_serves_on(context: Context) -> None:
    import socket

    handler = Counting()
    server = serve(context, ChannelSecurity(SECRET), handler)
    port = int(server.endpoint.rsplit(":", 1)[1])
    try:
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.sendall(os.urandom(4096))
        assert ask(ChannelSecurity(SECRET), server.endpoint, timeout=5) == b"ok"
        assert handler.calls == 1
    finally:
        server.close()


def test_without_a_secret_only_loopback_may_listen(
    context: Context, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(InsecureBindError, match=r"--secret-file.*--insecure"):
        ChannelSecurity().listen(context, zmq.ROUTER, "tcp://0.0.0.0:0")
    for url in ("tcp://127.0.0.1:0", "ipc:///tmp/lmc-test-security.ipc"):
        ChannelSecurity().listen(context, zmq.ROUTER, url).close(linger=0)
    with caplog.at_level(logging.WARNING, logger="lmc_connector.control.wire.security"):
        ChannelSecurity(insecure=True).listen(context, zmq.ROUTER, "tcp://0.0.0.0:0").close(0)
    assert "WITHOUT authentication" in caplog.text
    ChannelSecurity(SECRET).listen(context, zmq.ROUTER, "tcp://0.0.0.0:0").close(linger=0)


def test_the_zap_handler_ends_with_its_context() -> None:
    before = set(threading.enumerate())
    context: Context = zmq.Context()
    sock = ChannelSecurity(SECRET).listen(context, zmq.ROUTER, "tcp://127.0.0.1:0")
    (handler,) = [t for t in set(threading.enumerate()) - before if t.name == "lmc-zap"]
    sock.close(linger=0)
    done = threading.Event()

    def term() -> None:
        context.term()
        done.set()

    threading.Thread(target=term, daemon=True).start()
    assert done.wait(5), "Context.term() hung on the ZAP handler's socket"
    wait_until(lambda: not handler.is_alive(), 5, "the ZAP handler to end")


def test_the_same_secret_gives_the_same_fingerprint_and_a_short_one_is_refused(
    tmp_path: Path,
) -> None:
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    path.chmod(0o600)
    assert read_secret(path) == SECRET
    same = ChannelSecurity.from_file(path)
    assert same.fingerprint == ChannelSecurity(SECRET).fingerprint
    assert same.fingerprint != ChannelSecurity(b"another secret of enough length").fingerprint
    assert SECRET.decode() not in same.describe()
    path.write_bytes(b"short")
    with pytest.raises(SecretError, match="at least 16"):
        read_secret(path)
    with pytest.raises(SecretError, match="cannot read"):
        read_secret(tmp_path / "missing")


def test_many_requests_over_curve_all_arrive(context: Context) -> None:
    handler = Counting()
    server = serve(context, ChannelSecurity(SECRET), handler)
    client_context: Context = zmq.Context()
    client = RpcClient(client_context, "many", ChannelSecurity(SECRET))
    client.start()
    try:
        futures = [client.request(server.endpoint, [b"%d" % i], 10) for i in range(500)]
        assert all(f.result(15)[0].bytes == b"ok" for f in futures)
        assert handler.calls == 500
    finally:
        client.close()
        client_context.term()
        server.close()
