"""The agent's threads run on every CPU, even when started from a thread bound to one core.

vLLM's CPU worker binds its model-runner thread to one core, and starts the connector from
it. Threads inherit the mask of the thread that starts them, so without care the peer
server, the command server, the reporter and the ZeroMQ I/O threads all shared that one
core with the forward pass (and with every other worker bound to it), and a peer's fetch
could wait longer than its deadline to be read. Real sockets: B fetches A's chunks.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest
import zmq

from lmc_connector.affinity import threads_on_every_cpu
from lmc_connector.control.agent.peer_client import PeerClient
from lmc_connector.control.wire.security import ChannelSecurity
from lmc_connector.launch import free_port
from tests.control.harness import Worker, engine_config, start_worker
from tests.one_core import on_one_core

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux CPU masks and at least two CPUs",
)
TOKENS = list(range(500, 520))  # 5 chunks of 4 tokens


def _threads() -> dict[int, str]:
    """The threads of this process now, by id: Python threads by name, the others (ZeroMQ's)
    by their kernel name."""
    names = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names[int(tid)] = f.read().strip()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
    names.update((t.native_id, t.name) for t in threading.enumerate() if t.native_id in names)
    return names


def _start_from_one_core(instance_id: str) -> tuple[Worker, set[int]]:
    """Start a worker (engine + agent serving peers) from a thread bound to one CPU, as
    vLLM's model-runner thread is; returns it and the mask that thread had afterwards."""
    # No controller answers: the agent serves peers all the same.
    p2p = {"enable_p2p": True, "controller_reply_url": f"127.0.0.1:{free_port()}",
           "p2p_init_ports": [free_port()]}  # fmt: skip
    config = engine_config(free_port(), instance_id, [free_port()], **p2p)
    return on_one_core(lambda: (start_worker(config, 0, 1), os.sched_getaffinity(0)), timeout=30)


@pytest.fixture
def pinned_start() -> Iterator[tuple[Worker, set[int], dict[int, str]]]:
    before = _threads()
    worker, mask = _start_from_one_core("A-affinity")
    try:
        yield worker, mask, before
    finally:
        worker.agent.close()
        worker.engine.close()


def test_a_peer_fetch_is_served_by_threads_free_to_run_on_every_cpu(
    pinned_start: tuple[Worker, set[int], dict[int, str]],
) -> None:
    a, starter_mask, before = pinned_start
    every = os.sched_getaffinity(0)
    a.fill(TOKENS)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    client = PeerClient(context, a.engine, timeout_s=5.0, security=ChannelSecurity())
    client.start()
    try:
        address = a.agent.peer_server.endpoint
        keys = a.engine.hashes(TOKENS)
        assert len(list(client.fetch(address, keys))) == len(keys)
    finally:
        client.close()
        context.term()
    new = {tid: name for tid, name in _threads().items() if tid not in before}
    assert "lmc-peer-server-0" in new.values() and "ZMQbg/IO/0" in new.values(), new
    masks = {name: os.sched_getaffinity(tid) for tid, name in new.items()}
    assert {name: m for name, m in masks.items() if m != every} == {}
    assert starter_mask == {min(every)}  # the starting thread keeps its own core


def test_threads_started_inside_run_on_every_cpu_and_the_caller_keeps_its_mask() -> None:
    every = os.sched_getaffinity(0)
    seen: list[set[int]] = []
    starter: list[set[int]] = []

    def model_runner() -> None:
        os.sched_setaffinity(0, {max(every)})
        with threads_on_every_cpu():
            child = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0)))
            child.start()
        child.join(timeout=10)
        starter.append(os.sched_getaffinity(0))

    thread = threading.Thread(target=model_runner)
    thread.start()
    thread.join(timeout=10)
    assert seen == [every]
    assert starter == [{max(every)}]
