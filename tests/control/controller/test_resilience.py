"""Failures: controller restarts, dead and stopped workers, garbage on the monitor port."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import msgspec
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from lmc_connector.control.controller.http.app import create_app
from lmc_connector.control.controller.service import ControllerService
from lmc_connector.control.controller.settings import Settings
from lmc_connector.control.wire import commands as cmd
from lmc_connector.control.wire.codec import encode
from lmc_connector.control.wire.rpc import RpcClient
from lmc_connector.control.wire.security import ChannelSecurity
from lmc_connector.launch import free_port
from tests.control.conftest import InstanceFactory, new_controller
from tests.control.harness import (
    CPU,
    Controller,
    Worker,
    engine_config,
    registered,
    start_worker,
    start_worker_process,
    wait_until,
)

PROMPT = list(range(300, 312))
Hybrid = Callable[[str, bool], tuple[Worker, subprocess.Popen[bytes]]]


@pytest.fixture
def private_controller(tmp_path: Path) -> Iterator[Controller]:
    """A controller of the test's own, free to be restarted or attacked."""
    ctl = new_controller(tmp_path)
    ctl.start()
    yield ctl
    ctl.stop()


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait(timeout=10)


def layout_of(ctl: Controller, instance_id: str) -> list[object] | None:
    info = httpx.post(f"{ctl.url}/lookup", json={"tokens": PROMPT}, timeout=5).json()
    return info["layout_info"].get(instance_id)


def test_restarted_controller_rebuilds_its_index_from_agents(
    private_controller: Controller, make_instance: InstanceFactory
) -> None:
    for w in make_instance("restart-a", target=private_controller):
        w.fill(PROMPT)
    wait_until(lambda: layout_of(private_controller, "restart-a") == [CPU, 12], what="index")
    private_controller.stop()
    private_controller.start()
    wait_until(
        lambda: layout_of(private_controller, "restart-a") == [CPU, 12],
        what="agents to resync with the new controller",
    )


def test_a_restarted_controller_learns_the_calibrations_fitted_before_it_went(
    private_controller: Controller, make_instance: InstanceFactory
) -> None:
    prompt = list(range(800, 840))  # enough cached tokens to calibrate on
    for w in make_instance("restart-cal", target=private_controller):
        w.fill(prompt, seed=w.engine.layout.rank)
    url = private_controller.url
    event_id = httpx.post(f"{url}/calibrate", json={"instance_id": "restart-cal"}).json()
    wait_until(
        lambda: httpx.get(f"{url}/events/{event_id['event_id']}").json()["status"] == "finished",
        what="the calibration",
    )
    private_controller.stop()
    private_controller.start()
    wait_until(lambda: registered(url, "restart-cal", 2), what="the workers to register again")
    body = {"instance_id": "restart-cal", "method": "kvtc", "location": CPU, "tokens": prompt}
    answer = httpx.post(f"{url}/compress", json=body, timeout=10)
    assert answer.status_code == 200, answer.text  # not a 409: the registrations said so


@pytest.fixture
def hybrid(
    private_controller: Controller, processes: list[subprocess.Popen[bytes]]
) -> Iterator[Callable[[str, bool], tuple[Worker, subprocess.Popen[bytes]]]]:
    """An instance with rank 0 in this process and rank 1 in a subprocess, both holding PROMPT."""
    local: list[Worker] = []

    def make(instance_id: str, block_jobs: bool) -> tuple[Worker, subprocess.Popen[bytes]]:
        ctl = private_controller
        proc = start_worker_process(
            ctl.monitor_port, instance_id, free_port(), 1, 2, PROMPT, block_jobs
        )
        processes.append(proc)
        rank0 = start_worker(engine_config(ctl.monitor_port, instance_id, [free_port()]), 0, 2)
        local.append(rank0)
        rank0.fill(PROMPT)
        wait_until(lambda: layout_of(ctl, instance_id) == [CPU, 12], timeout=30, what="both ranks")
        return rank0, proc

    yield make
    for worker in local:
        worker.agent.close()


def test_worker_killed_mid_command_fails_the_event_and_drops_its_chunks(
    private_controller: Controller, hybrid: Hybrid
) -> None:
    ctl = private_controller
    _, proc = hybrid("kill-a", True)
    body = {"instance_id": "kill-a", "method": "cachegen", "location": CPU, "tokens": PROMPT}
    answer = httpx.post(f"{ctl.url}/compress", json=body, timeout=10)
    assert answer.status_code == 200, answer.text
    event_id = answer.json()["event_id"]
    proc.kill()

    def failed() -> dict[str, object] | None:
        event = httpx.get(f"{ctl.url}/events/{event_id}", timeout=5).json()
        return event if event["status"] == "failed" else None

    event = wait_until(failed, what="the event to fail")
    assert "worker 1" in str(event["error"])
    assert ctl.alive() and httpx.get(f"{ctl.url}/health").status_code == 200
    assert layout_of(ctl, "kill-a") is None  # rank 1's chunks dropped: no complete prefix


def test_stopped_worker_gives_503_and_leaves_the_cache_untouched(
    private_controller: Controller, hybrid: Hybrid
) -> None:
    ctl = private_controller
    rank0, proc = hybrid("stop-a", False)
    os.kill(proc.pid, signal.SIGSTOP)
    body = {"instance_id": "stop-a", "method": "cachegen", "location": CPU, "tokens": PROMPT}
    answer = httpx.post(f"{ctl.url}/compress", json=body, timeout=10)
    assert answer.status_code == 503, answer.text
    event = httpx.get(f"{ctl.url}/events/{answer.json()['event_id']}").json()
    assert event["status"] == "failed"
    engine = rank0.engine
    wait_until(
        lambda: not any(engine.is_pinned(k) for k in engine.hashes(PROMPT)),
        what="rank 0 to abort and release its pins",
    )
    assert not any(rank0.encoded(PROMPT))


def test_a_stopped_worker_does_not_delay_other_requests(
    private_controller: Controller, hybrid: Hybrid
) -> None:
    ctl = private_controller
    _, proc = hybrid("slow-a", False)
    os.kill(proc.pid, signal.SIGSTOP)
    body = {"instance_id": "slow-a", "method": "cachegen", "location": CPU, "tokens": PROMPT}
    hung = threading.Thread(target=lambda: httpx.post(f"{ctl.url}/compress", json=body, timeout=10))
    hung.start()
    started = time.monotonic()
    for _ in range(5):
        assert (
            httpx.post(f"{ctl.url}/lookup", json={"tokens": PROMPT}, timeout=5).status_code == 200
        )
    assert time.monotonic() - started < 0.9  # well inside the 1 s command timeout
    hung.join()


def malformed_count(ctl: Controller) -> int:
    text = httpx.get(f"{ctl.url}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "lmc_controller_malformed_messages_total":
                return int(sample.value)
    return 0


def test_garbage_on_the_monitor_port_leaves_the_controller_running(
    private_controller: Controller, make_instance: InstanceFactory
) -> None:
    ctl = private_controller
    with socket.create_connection(("127.0.0.1", ctl.monitor_port)) as raw:
        raw.sendall(os.urandom(4096))
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{ctl.monitor_port}")
    for payload in (b"\xff\x00garbage", msgspec.msgpack.encode({"type": "Register"}), b""):
        push.send(payload)
    push.close(linger=1000)
    context.term()
    # Raw bytes may parse as legacy ZMTP frames (more malformed messages): at least our 3.
    wait_until(lambda: malformed_count(ctl) >= 3, what="malformed messages counted")
    for w in make_instance("after-garbage", target=ctl):
        w.fill(PROMPT)
    wait_until(lambda: layout_of(ctl, "after-garbage") == [CPU, 12], what="normal service")


def test_a_heartbeat_with_a_bad_host_is_counted_as_malformed(
    private_controller: Controller,
) -> None:
    ctl = private_controller
    before = malformed_count(ctl)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{ctl.monitor_port}")
    beat = {"type": "Heartbeat", "instance_id": "x", "rank": 0, "session": "s"}
    push.send(msgspec.msgpack.encode({**beat, "host": "bad host", "port": 8001}))
    push.close(linger=1000)
    context.term()
    wait_until(lambda: malformed_count(ctl) > before, what="the heartbeat counted as malformed")
    assert httpx.get(f"{ctl.url}/health").status_code == 200


def test_an_unexpected_worker_error_is_answered_as_internal_and_logged(
    http: httpx.Client, make_instance: InstanceFactory, caplog: pytest.LogCaptureFixture
) -> None:
    rank0, _ = make_instance("crash-a")

    def crash(prepare: cmd.Prepare, received: float | None = None, owner: bytes = b"") -> cmd.Reply:
        raise RuntimeError("engine exploded")

    rank0.agent._executor.prepare = crash
    body = {"instance_id": "crash-a", "method": "cachegen", "location": CPU, "tokens": PROMPT}
    with caplog.at_level(logging.ERROR, logger="lmc_connector.control.agent"):
        answer = http.post("/compress", json=body)
    assert answer.status_code == 503, answer.text
    assert "worker 0: RuntimeError: engine exploded" in answer.json()["detail"]
    assert "no answer" not in answer.json()["detail"]  # a reply, not the 1 s timeout
    assert "engine exploded" in caplog.text


def test_a_commit_failing_on_one_worker_says_where_it_was_applied(
    http: httpx.Client, make_instance: InstanceFactory
) -> None:
    rank0, rank1 = make_instance("half-a")
    for w in (rank0, rank1):
        w.fill(PROMPT)
    rank1.agent._executor.commit = lambda commit: cmd.Failed("bad_request", "disk gone")
    answer = http.post("/pin", json={"instance_id": "half-a", "tokens": PROMPT})
    assert answer.status_code == 503, answer.text
    detail = answer.json()["detail"]
    assert "applied on worker(s) 0, not on worker(s) 1" in detail and "disk gone" in detail
    event = http.get(f"/events/{answer.json()['event_id']}").json()
    assert event["status"] == "failed" and "applied on worker(s) 0" in event["error"]
    assert all(rank0.engine.is_pinned(k) for k in rank0.engine.hashes(PROMPT))


def test_prepare_ttl_is_relative_to_the_workers_clock_and_capped(
    make_instance: InstanceFactory,
) -> None:
    (worker,) = make_instance("ttl-a", world_size=1)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    client = RpcClient(context, "test", ChannelSecurity())
    client.start()
    address = f"tcp://127.0.0.1:{worker.agent.spec.port}"
    decoder = cmd.reply_decoder()

    def ask(command: cmd.Command) -> cmd.Reply:
        return decoder.decode(client.call(address, [encode(command)], 5.0)[0].buffer)

    try:
        op = cmd.UnpinOp(PROMPT)
        assert isinstance(ask(cmd.Prepare("e1", op, 5.0)), cmd.Ok)
        assert isinstance(ask(cmd.Abort("e1")), cmd.Ok)
        forever = msgspec.msgpack.encode(
            {"type": "Prepare", "event_id": "e2", "op": msgspec.to_builtins(op), "ttl_s": 1e12}
        )
        refused = decoder.decode(client.call(address, [forever], 5.0)[0].buffer)
        assert isinstance(refused, cmd.Failed) and refused.code == "bad_request"
        assert "ttl_s" in refused.error and not worker.agent._executor._prepared
    finally:
        client.close()
        context.term()


def test_http_handlers_never_wait_for_the_controller_lock_on_the_event_loop() -> None:
    service = ControllerService(Settings(port=free_port(), monitor_port=free_port()))
    app = create_app(service)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with service.state.lock:  # as the monitor thread does, applying a huge snapshot
            held.set()
            release.wait(5)

    async def scenario() -> tuple[float, int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://controller") as client:
            requests = [
                asyncio.create_task(client.request(method, path, json=body))
                for method, path, body in (
                    ("GET", "/health", None),
                    ("GET", "/instances", None),
                    ("GET", "/metrics", None),
                    ("POST", "/lookup", {"tokens": PROMPT}),
                )
            ]
            started = time.monotonic()
            await asyncio.sleep(0.05)
            stalled = time.monotonic() - started
            release.set()
            answers = await asyncio.gather(*requests)
            return stalled, max(a.status_code for a in answers)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(5)
    try:
        stalled, worst = asyncio.run(scenario())
    finally:
        release.set()
        holder.join()
        service.close()
    assert stalled < 1.0, f"the event loop stalled {stalled:.2f} s behind the lock"
    assert worst == 200


def test_health_reports_an_internal_thread_that_stopped() -> None:
    service = ControllerService(Settings(port=free_port(), monitor_port=free_port()))
    service.start()
    app = create_app(service)

    async def health() -> dict[str, object]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://controller") as client:
            return dict((await client.get("/health")).json())

    try:
        assert asyncio.run(health())["status"] == "ok"
        # A fake for a crash that cannot be caused on purpose: the command thread ends.
        service.commands.close()
        answer = asyncio.run(health())
    finally:
        service.close()
    assert answer["status"] == "degraded"
    assert "internal thread 'commands' stopped" in str(answer["problems"])
