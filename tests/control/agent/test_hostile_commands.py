"""Attacks on a worker's command port from loopback (where an agent without a secret
listens), against a real agent: what it holds stays bounded, its logs stay short, and the
controller's commands keep working."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx
import msgspec
import pytest
import zmq

from lmc_connector.control.agent.executor import MAX_PREPARED_PER_PEER
from lmc_connector.control.wire import commands as cmd
from lmc_connector.control.wire.codec import encode
from lmc_connector.control.wire.rpc import RpcClient
from lmc_connector.control.wire.security import ChannelSecurity
from tests.control.conftest import InstanceFactory
from tests.control.harness import CPU, Controller

PROMPT = list(range(900, 912))


@pytest.fixture
def attacker() -> Iterator[RpcClient]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    client = RpcClient(context, "attacker", ChannelSecurity())
    client.start()
    yield client
    client.close()
    context.term()


def send_all(client: RpcClient, address: str, payloads: list[bytes]) -> list[cmd.Reply]:
    decoder = cmd.reply_decoder()
    futures = [client.request(address, [p], 30) for p in payloads]
    return [decoder.decode(f.result(35)[0].buffer) for f in futures]


def test_a_flood_of_prepares_stays_bounded_and_commands_keep_working(
    controller: Controller, make_instance: InstanceFactory, attacker: RpcClient
) -> None:
    (worker,) = make_instance("prep-flood", world_size=1)
    worker.fill(PROMPT)
    address = f"tcp://127.0.0.1:{worker.agent.spec.port}"
    op = msgspec.to_builtins(cmd.TransformOp("compress", "fp8", CPU, PROMPT))
    forever = [
        msgspec.msgpack.encode({"type": "Prepare", "event_id": f"f{i}", "op": op, "ttl_s": 1e12})
        for i in range(2000)
    ]
    replies = send_all(attacker, address, forever)
    assert all(isinstance(r, cmd.Failed) and "ttl_s" in r.error for r in replies)
    held = [
        encode(cmd.Prepare(f"h{i}", cmd.TransformOp("compress", "fp8", CPU, PROMPT), 300))
        for i in range(3000)
    ]
    for start in range(0, len(held), 50):  # in waves that the worker's queue takes whole
        assert all(isinstance(r, cmd.Ok) for r in send_all(attacker, address, held[start:][:50]))
    assert len(worker.agent._executor._prepared) == MAX_PREPARED_PER_PEER
    assert max(worker.engine.ctx.pins.values()) == MAX_PREPARED_PER_PEER  # dropped: released
    flood = [attacker.request(address, [p], 30) for p in held]
    # While a flood is queued at the worker, the controller's commands still get through.
    body = {"instance_id": "prep-flood", "method": "fp8", "location": CPU, "tokens": PROMPT}
    during = httpx.post(f"{controller.url}/compress", json=body, timeout=10)
    decoder = cmd.reply_decoder()
    replies = [decoder.decode(f.result(35)[0].buffer) for f in flood]
    assert during.status_code == 200, during.text
    assert all(isinstance(r, cmd.Ok) or r.code == "busy" for r in replies)
    answer = httpx.post(
        f"{controller.url}/pin", json={"instance_id": "prep-flood", "tokens": PROMPT}
    )
    assert answer.status_code == 200 and answer.json()["num_tokens"] == 12


def test_bad_frames_are_logged_a_few_times_not_each(
    make_instance: InstanceFactory, attacker: RpcClient, caplog: pytest.LogCaptureFixture
) -> None:
    (worker,) = make_instance("bad-frames", world_size=1)
    address = f"tcp://127.0.0.1:{worker.agent.spec.port}"
    with caplog.at_level(logging.WARNING):
        replies = send_all(attacker, address, [b"\xc1 not msgpack %d" % i for i in range(2000)])
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        raw = context.socket(zmq.DEALER)
        raw.connect(address)
        for _ in range(2000):
            raw.send(b"one frame: no request id")
        raw.close(linger=2000)
        context.term()
        assert send_all(attacker, address, [encode(cmd.Abort("x"))]) == [cmd.Ok()]
    assert all(isinstance(r, cmd.Failed) and r.code == "bad_request" for r in replies)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) <= 4, [r.getMessage() for r in warnings]
