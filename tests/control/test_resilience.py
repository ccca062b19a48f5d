"""Failures: controller restarts, dead and stopped workers, garbage on the monitor port."""

from __future__ import annotations

import os
import re
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

from tests.control.conftest import InstanceFactory, new_controller
from tests.control.harness import (
    CPU,
    Controller,
    Worker,
    engine_config,
    free_port,
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
    match = re.search(r"^lmc_controller_malformed_messages_total (\d+)$", text, re.M)
    return int(match.group(1)) if match else 0


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
