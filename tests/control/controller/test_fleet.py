"""A fleet of 5,000 workers on one controller: registration, heartbeats, commands, listings,
and no socket left behind once they are gone. The workers are simulated on real sockets:
one registration and heartbeat stream (as each agent's reporter sends) and 5,000 real
command ports that answer like agents (`peers.CommandPorts`)."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest

from lmc_connector.control.wire import commands as cmd
from lmc_connector.control.wire import monitor as mon
from tests.control.conftest import new_controller
from tests.control.harness import Controller, wait_until
from tests.control.peers import CommandPorts, MonitorPeer, heartbeat, register

WORKERS = 5000
WORLD_SIZE = 4
#: Seconds between two registrations of a worker not yet acknowledged (as a reporter does).
RETRY_S = 2.0


@pytest.fixture(scope="module")
def fleet_ports() -> Iterator[CommandPorts]:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4 * WORKERS and os.geteuid() == 0:
        resource.setrlimit(resource.RLIMIT_NOFILE, (4 * WORKERS, 4 * WORKERS))
    ports = CommandPorts(WORKERS)
    yield ports
    ports.close()


@pytest.fixture(scope="module")
def fleet_controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Controller]:
    ctl = new_controller(tmp_path_factory.mktemp("fleet"), "--worker-timeout", "120")
    ctl.start()
    yield ctl
    ctl.stop()


def fleet(ports: CommandPorts) -> list[mon.Register]:
    return [
        register(f"fleet-{i // WORLD_SIZE:04d}", i % WORLD_SIZE, f"s{i}", port, WORLD_SIZE)
        for i, port in enumerate(ports.ports)
    ]


def connections_to(ctl: Controller, ports: set[int]) -> int:
    assert ctl.process is not None
    connections = psutil.Process(ctl.process.pid).net_connections("tcp")
    return sum(1 for c in connections if c.raddr and c.raddr.port in ports)


def test_five_thousand_workers_register_heartbeat_take_commands_and_leave(
    fleet_controller: Controller, fleet_ports: CommandPorts
) -> None:
    ctl, workers = fleet_controller, fleet(fleet_ports)
    with MonitorPeer(ctl.monitor_port) as reporter:
        deadline = time.monotonic() + 180
        while waiting := [w for w in workers if w.session not in fleet_ports.acknowledged()]:
            assert time.monotonic() < deadline, f"{len(waiting)} workers never acknowledged"
            reporter.send(*waiting)
            time.sleep(RETRY_S)
        reporter.send(*[heartbeat(w.instance_id, w.rank, w.session, w.port) for w in workers])
        with httpx.Client(base_url=ctl.url, timeout=60) as http:
            health = http.get("/health").json()
            assert (health["status"], health["workers"]) == ("ok", WORKERS), health
            listed = http.get("/instances").json()["instances"]
            assert sum(len(i["workers"]) for i in listed) == WORKERS
            assert len(listed) == WORKERS // WORLD_SIZE
            for n in range(0, WORKERS // WORLD_SIZE, 250):
                body = {"instance_id": f"fleet-{n:04d}", "tokens": list(range(12))}
                assert http.post("/pin", json=body).status_code == 200
            assert len(fleet_ports.of_kind(cmd.Commit)) == 5 * WORLD_SIZE
            assert fleet_ports.of_kind(cmd.Resync) == []  # every heartbeat came from a known one
            reporter.send(*[mon.Deregister(w.instance_id, w.rank, w.session) for w in workers])
            wait_until(lambda: http.get("/health").json()["workers"] == 0, 60, "departures")
    wait_until(
        lambda: connections_to(ctl, set(fleet_ports.ports)) == 0,
        30,
        "the controller to close its sockets to departed workers",
    )
