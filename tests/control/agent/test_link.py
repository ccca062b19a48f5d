"""A worker says in its log whether its controller answers: a wrong `controller_pull_url`
or a controller that is down is never silent."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmc_connector.control.agent import link
from lmc_connector.launch import free_port
from tests.control.conftest import new_controller
from tests.control.harness import Controller, engine_config, start_worker, wait_until


class Lines(logging.Handler):
    """The agent's log lines (attached to its logger: independent of logging set-up)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def said(self, text: str) -> bool:
        return any(text in line for line in self.lines)


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    agent_logger = logging.getLogger("lmc_connector.control.agent")
    level = agent_logger.level
    agent_logger.addHandler(handler)
    agent_logger.setLevel(logging.INFO)
    yield handler
    agent_logger.removeHandler(handler)
    agent_logger.setLevel(level)


def test_an_unreachable_controller_is_warned_about_then_registration_is_logged(
    lines: Lines, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(link, "UNREACHABLE_WARN_S", 0.3)
    controller: Controller = new_controller(tmp_path)  # not started yet: nobody listens
    config = engine_config(controller.monitor_port, "link-a", [free_port()])
    worker = start_worker(config, 0, 1)
    try:
        wait_until(lambda: lines.said("has not answered"), what="the unreachable warning")
        assert not lines.said("registered with")
        warning = next(line for line in lines.lines if "has not answered" in line)
        assert f"127.0.0.1:{controller.monitor_port}" in warning
        assert "--monitor-port" in warning
        controller.start()
        wait_until(lambda: lines.said("control agent link-a/0 registered with 0 chunks"))
        assert not lines.said("again")  # the first connection is the registration's line
        controller.stop()
        wait_until(lambda: lines.said("lost the controller"), what="the lost-controller warning")
        controller.start()
        wait_until(lambda: lines.said("connected to the controller again"), what="reconnection")
    finally:
        worker.agent.close()
        controller.stop()
