"""The request/reply transport on real sockets: answers, deadlines, notifications, bounds."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import zmq

from lmc_connector.control.wire.rpc import Call, RpcClient, RpcSendError, RpcServer, RpcTimeout
from lmc_connector.control.wire.rpc import client as rpc_client
from lmc_connector.control.wire.security import ChannelSecurity
from lmc_connector.launch import free_port
from tests.control.harness import wait_until

Context = zmq.Context[zmq.Socket[bytes]]
LOCAL = ChannelSecurity()


@pytest.fixture
def context() -> Iterator[Context]:
    ctx: Context = zmq.Context()
    yield ctx
    ctx.term()


@pytest.fixture
def client(context: Context) -> Iterator[RpcClient]:
    c = RpcClient(context, "test-client", LOCAL)
    c.start()
    yield c
    c.close()


def serve(context: Context, handler: object) -> RpcServer:
    server = RpcServer(context, f"tcp://127.0.0.1:{free_port()}", handler, "test-server", LOCAL)  # type: ignore[arg-type]
    server.start()
    return server


def echo(call: Call) -> None:
    call.reply([b"echo:" + call.frames[0].bytes, *[f.bytes for f in call.frames[1:]]])


def test_a_request_gets_its_own_answer_with_every_frame(
    context: Context, client: RpcClient
) -> None:
    server = serve(context, echo)
    try:
        futures = [client.request(server.endpoint, [b"%d" % i, b"x" * i], 5) for i in range(50)]
        answers = [[f.bytes for f in fut.result(5)] for fut in futures]
    finally:
        server.close()
    assert answers == [[b"echo:%d" % i, b"x" * i] for i in range(50)]


def test_a_call_answered_later_from_another_thread_arrives(
    context: Context, client: RpcClient
) -> None:
    def later(call: Call) -> None:
        threading.Timer(0.05, call.reply, args=([b"late"],)).start()

    server = serve(context, later)
    try:
        assert [f.bytes for f in client.call(server.endpoint, [b"q"], 5)] == [b"late"]
    finally:
        server.close()


def test_a_silent_server_times_out_and_an_unusable_address_fails_fast(client: RpcClient) -> None:
    with pytest.raises(RpcTimeout):
        client.request(f"tcp://127.0.0.1:{free_port()}", [b"q"], 0.2).result(5)
    with pytest.raises(RpcSendError, match="bad host"):
        client.request("tcp://bad host:8001", [b"q"], 5).result(5)
    assert client.alive


def test_notifications_are_delivered_and_never_answered(
    context: Context, client: RpcClient
) -> None:
    seen: list[bool] = []

    def record(call: Call) -> None:
        seen.append(call.wants_reply)
        call.reply([b"ignored"])

    server = serve(context, record)
    try:
        client.notify(server.endpoint, [b"n"])
        wait_until(lambda: seen == [False], what="the notification")
        assert client.call(server.endpoint, [b"q"], 5)[0].bytes == b"ignored"
    finally:
        server.close()


def test_malformed_envelopes_are_counted_and_the_server_keeps_serving(
    context: Context, client: RpcClient
) -> None:
    server = serve(context, echo)
    raw = context.socket(zmq.DEALER)
    raw.connect(server.endpoint)
    try:
        raw.send_multipart([b"short"])
        raw.send_multipart([b"not-eight", b"payload"])
        wait_until(lambda: server.malformed == 2, what="malformed requests counted")
        assert client.call(server.endpoint, [b"ok"], 5)[0].bytes == b"echo:ok"
    finally:
        raw.close(linger=0)
        server.close()


def test_a_handler_that_raises_fails_only_its_request(context: Context, client: RpcClient) -> None:
    def flaky(call: Call) -> None:
        if call.frames[0].bytes == b"boom":
            raise RuntimeError("boom")
        echo(call)

    server = serve(context, flaky)
    try:
        with pytest.raises(RpcTimeout):
            client.request(server.endpoint, [b"boom"], 0.3).result(5)
        assert client.call(server.endpoint, [b"fine"], 5)[0].bytes == b"echo:fine"
    finally:
        server.close()


def test_sockets_to_many_servers_stay_bounded(
    context: Context, client: RpcClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rpc_client, "MAX_OPEN_SOCKETS", 8)
    for _ in range(40):
        client.notify(f"tcp://127.0.0.1:{free_port()}", [b"n"])
    server = serve(context, echo)
    try:
        assert client.call(server.endpoint, [b"still"], 5)[0].bytes == b"echo:still"
        assert len(client._sockets) <= 8 + 1
    finally:
        server.close()
