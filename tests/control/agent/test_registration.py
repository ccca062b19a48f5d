"""A worker keeps registering until the controller answers, and says at WARNING why not."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from lmc_connector.control.agent import link, registration
from lmc_connector.launch import free_port
from tests.control.conftest import InstanceFactory, new_controller
from tests.control.harness import (
    Controller,
    Worker,
    engine_config,
    registered,
    start_worker,
    wait_until,
)

AGENT_LOG = "lmc_connector.control.agent"


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registration, "REGISTER_RETRY_S", 0.2)
    monkeypatch.setattr(registration, "UNANSWERED_WARN_S", 0.5)
    monkeypatch.setattr(link, "UNREACHABLE_WARN_S", 0.5)


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.agent.close()


def test_a_worker_started_before_its_controller_warns_then_registers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, workers: list[Worker]
) -> None:
    ctl = new_controller(tmp_path)
    config = engine_config(ctl.monitor_port, "early", [free_port()])
    with caplog.at_level(logging.INFO, logger=AGENT_LOG):
        workers.append(start_worker(config, 0, 1))
        wait_until(lambda: "has not answered" in caplog.text, what="a warning")
        ctl.start()
        try:
            wait_until(lambda: workers[0].agent._reporter.acknowledged, what="the answer")
            assert registered(ctl.url, "early", 1)
        finally:
            ctl.stop()
    assert "early/0 registered with 0 chunks (acknowledged after" in caplog.text


def test_a_registration_lost_on_the_way_is_sent_again(
    tmp_path: Path, workers: list[Worker]
) -> None:
    ctl = new_controller(tmp_path)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    swallow = context.socket(zmq.PULL)  # takes the monitor port and drops what it reads
    swallow.bind(f"tcp://127.0.0.1:{ctl.monitor_port}")
    # No heartbeat (and so no resync request) for a minute: only re-sending can register it.
    config = engine_config(
        ctl.monitor_port, "lost", [free_port()], controller_heartbeat_interval=60.0
    )
    workers.append(start_worker(config, 0, 1))
    assert swallow.poll(10_000), "the registration never left the worker"
    while swallow.poll(200):
        swallow.recv()
    swallow.close(linger=0)
    context.term()
    ctl.start()
    try:
        wait_until(lambda: registered(ctl.url, "lost", 1), 20, "the registration sent again")
        wait_until(lambda: workers[0].agent._reporter.acknowledged, what="the answer")
    finally:
        ctl.stop()


def test_a_refused_worker_logs_the_controllers_reason(
    controller: Controller,
    make_instance: InstanceFactory,
    caplog: pytest.LogCaptureFixture,
    workers: list[Worker],
) -> None:
    make_instance("one-rank", world_size=1)
    config = engine_config(controller.monitor_port, "one-rank", [free_port()])
    with caplog.at_level(logging.WARNING, logger=AGENT_LOG):
        workers.append(start_worker(config, 1, 2))  # rank 1 of 2 joins an instance of 1
        wait_until(lambda: "refused it:" in caplog.text, what="the refusal")
    assert "world_size=1" in caplog.text and "another lmcache_instance_id" in caplog.text
    assert not workers[0].agent._reporter.acknowledged
