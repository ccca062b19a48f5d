from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmc_connector.launch import free_port, free_ports
from tests.control.harness import (
    Controller,
    Worker,
    engine_config,
    registered,
    start_worker,
    wait_until,
)

#: Short timeouts keep failure-path tests fast; workers heartbeat every 0.1 s.
WORKER_TIMEOUT = "1.5"
COMMAND_TIMEOUT = "1"


def new_controller(tmp: Path, *args: str, env: dict[str, str] | None = None) -> Controller:
    return Controller(
        free_port(),
        free_port(),
        args=["--worker-timeout", WORKER_TIMEOUT, "--command-timeout", COMMAND_TIMEOUT, *args],
        env=env or {},
        log=tmp / "controller.log",
    )


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Controller]:
    ctl = new_controller(tmp_path_factory.mktemp("controller"))
    ctl.start()
    yield ctl
    ctl.stop()


@pytest.fixture
def http(controller: Controller) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=controller.url, timeout=10) as client:
        yield client


InstanceFactory = Callable[..., list[Worker]]


@pytest.fixture
def make_instance(controller: Controller, tmp_path: Path) -> Iterator[InstanceFactory]:
    """Start `world_size` in-process workers of one instance and wait until registered."""
    started: list[Worker] = []

    def make(
        instance_id: str,
        world_size: int = 2,
        chunk_size: int = 4,
        disk: bool = False,
        target: Controller | None = None,
        **extra: Any,
    ) -> list[Worker]:
        ctl = target or controller
        ports = free_ports(2 * world_size)
        if extra.get("enable_p2p"):
            # Peer ports chosen with the command ports, so that none of them collide.
            extra["p2p_init_ports"], ports = ports[world_size:], ports[:world_size]
        else:
            ports = ports[:world_size]
        if disk:
            extra["local_disk"] = str(tmp_path / f"disk-{instance_id}")
        config = engine_config(ctl.monitor_port, instance_id, ports, chunk_size=chunk_size, **extra)
        workers = [start_worker(config, rank, world_size) for rank in range(world_size)]
        started.extend(workers)
        wait_until(lambda: registered(ctl.url, instance_id, world_size), what="registration")
        return workers

    yield make
    for worker in started:
        worker.agent.close()
