"""Attacks a peer on the monitor port could make (here from loopback, where a controller
without a secret listens), each against a real controller and real agents: the instance
keeps serving, commands keep working, the controller's resources stay bounded."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import psutil
import pytest

from lmc_connector.control.controller.service import NOTICES_PER_S
from lmc_connector.control.wire import commands as cmd
from lmc_connector.control.wire import monitor as mon
from lmc_connector.control.wire.rpc.client import MAX_OPEN_SOCKETS
from lmc_connector.launch import free_port
from lmc_connector.tokens import ChunkKey
from tests.control.conftest import InstanceFactory, new_controller
from tests.control.harness import CPU, Controller, registered, wait_until
from tests.control.peers import CommandPorts, MonitorPeer, heartbeat, job_done, register

PROMPT = list(range(700, 712))


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Controller]:
    """A controller of the test's own, to be attacked."""
    ctl = new_controller(tmp_path)
    ctl.start()
    yield ctl
    ctl.stop()


def lookup(ctl: Controller, instance_id: str) -> object:
    answer = httpx.post(f"{ctl.url}/lookup", json={"tokens": PROMPT}, timeout=5).json()
    return answer["layout_info"].get(instance_id)


def pin(ctl: Controller, instance_id: str) -> httpx.Response:
    body = {"instance_id": instance_id, "tokens": PROMPT}
    return httpx.post(f"{ctl.url}/pin", json=body, timeout=10)


def test_a_forged_rank_of_a_bigger_world_leaves_the_instance_serving(
    target: Controller, make_instance: InstanceFactory
) -> None:
    (worker,) = make_instance("shape-a", world_size=1, target=target)
    worker.fill(PROMPT)
    wait_until(lambda: lookup(target, "shape-a") == [CPU, 12], what="the index")
    with MonitorPeer(target.monitor_port) as attacker:
        attacker.send(register("shape-a", 1, "forged", free_port(), world_size=2))
        attacker.send(register("shape-a", 0, "forged", free_port(), chunk_size=8))
        attacker.send(register("probe", 0, "p", free_port()))  # read after the forgeries
    wait_until(lambda: registered(target.url, "probe", 1), what="the forgeries to be read")
    assert pin(target, "shape-a").status_code == 200
    assert lookup(target, "shape-a") == [CPU, 12]
    (instance,) = [
        i
        for i in httpx.get(f"{target.url}/instances").json()["instances"]
        if i["instance_id"] == "shape-a"
    ]
    assert (instance["world_size"], instance["chunk_size"]) == (1, 4)


def test_re_registering_a_live_rank_does_not_divert_its_commands(
    target: Controller, make_instance: InstanceFactory
) -> None:
    (worker,) = make_instance("hijack-a", world_size=1, target=target)
    worker.fill(PROMPT)
    hijacker = CommandPorts(1)  # where the forged registrations point
    stop = threading.Event()

    def keep_registering() -> None:
        with MonitorPeer(target.monitor_port) as attacker:
            while not stop.is_set():
                attacker.send(register("hijack-a", 0, "forged", hijacker.ports[0]))
                stop.wait(0.05)

    thread = threading.Thread(target=keep_registering)
    thread.start()
    try:
        answers = [pin(target, "hijack-a").status_code for _ in range(20)]
    finally:
        stop.set()
        thread.join()
        hijacker.close()
    assert answers == [200] * 20
    assert hijacker.of_kind(cmd.Prepare) == [] and hijacker.of_kind(cmd.Commit) == []
    refusals = hijacker.of_kind(cmd.RegistrationRefused)
    assert refusals and "held by a live worker" in refusals[0].reason
    assert worker.engine.is_pinned(worker.engine.hashes(PROMPT)[0])
    metrics = httpx.get(f"{target.url}/metrics").text
    refused = re.search(r"^lmc_controller_refused_registrations_total ([\d.]+)$", metrics, re.M)
    assert refused is not None and float(refused.group(1)) >= len(refusals)


def test_a_job_done_of_another_session_cannot_end_a_running_compress(
    target: Controller, make_instance: InstanceFactory
) -> None:
    (worker,) = make_instance("forge-done", world_size=1, target=target)
    worker.fill(PROMPT)
    release = threading.Event()
    real_run = worker.engine.run

    def blocked_run(job: object) -> object:
        release.wait(30)
        return real_run(job)

    worker.engine.run = blocked_run
    body = {"instance_id": "forge-done", "method": "fp8", "location": CPU, "tokens": PROMPT}
    event_id = httpx.post(f"{target.url}/compress", json=body, timeout=10).json()["event_id"]
    with MonitorPeer(target.monitor_port) as attacker:
        attacker.send(job_done("forge-done", 0, "forged", event_id))
        attacker.send(register("probe", 0, "p", free_port()))
    wait_until(lambda: registered(target.url, "probe", 1), what="the forgery to be read")
    event = httpx.get(f"{target.url}/events/{event_id}").json()
    assert event["status"] == "running" and event["workers"][0].get("bytes_after", 0) == 0
    release.set()
    wait_until(
        lambda: httpx.get(f"{target.url}/events/{event_id}").json()["status"] == "finished",
        what="the real job to finish",
    )


def test_heartbeats_naming_a_thousand_addresses_leave_commands_working(
    target: Controller, make_instance: InstanceFactory
) -> None:
    (worker,) = make_instance("flood-a", world_size=1, target=target)
    worker.fill(PROMPT)
    listeners = CommandPorts(1100)  # the addresses exist: each resync request opens a socket
    assert target.process is not None
    controller = psutil.Process(target.process.pid)
    open_files, pins = [], []
    try:
        with MonitorPeer(target.monitor_port) as attacker:
            for round_ in range(6):  # heartbeats repeat, as workers' do
                attacker.send(
                    *[heartbeat("ghost", 0, f"g{i}", p) for i, p in enumerate(listeners.ports)]
                )
                pins.append(pin(target, "flood-a").status_code)

                def answered(n: int = round_) -> bool:
                    open_files.append(controller.num_fds())
                    return len(listeners.of_kind(cmd.Resync)) > 100 * n

                wait_until(answered, what="resync requests")
        health = httpx.get(f"{target.url}/health").json()
    finally:
        listeners.close()
    assert pins == [200] * 6
    assert health["status"] == "ok", health
    # Two descriptors per socket (its mailbox, its connection): those kept open and those
    # closed for room but still flushing, at most one second of notices.
    assert max(open_files) < 2 * (MAX_OPEN_SOCKETS + NOTICES_PER_S) + 400, max(open_files)


def test_a_short_usage_report_is_dropped_and_every_listing_answers(target: Controller) -> None:
    with MonitorPeer(target.monitor_port) as attacker:
        attacker.send(register("usage-a", 0, "s", free_port()))
        beat = {
            "type": "Heartbeat",
            "instance_id": "usage-a",
            "rank": 0,
            "session": "s",
            "host": "127.0.0.1",
            "port": 8001,
            "usage": {CPU: [1, 2]},  # a TierReport has three numbers
        }
        attacker.send(msgspec.msgpack.encode(beat))
    wait_until(lambda: registered(target.url, "usage-a", 1), what="the registration")
    wait_until(
        lambda: (
            "lmc_controller_malformed_messages_total 1" in httpx.get(f"{target.url}/metrics").text
        ),
        what="the heartbeat to be dropped",
    )
    assert httpx.get(f"{target.url}/instances").status_code == 200
    info = httpx.post(f"{target.url}/query_worker_info", json={"instance_id": "usage-a"})
    assert info.status_code == 200, info.text


def test_errors_quote_a_huge_id_briefly_and_list_at_most_twenty_instances(
    target: Controller,
) -> None:
    with MonitorPeer(target.monitor_port) as attacker:
        attacker.send(*[register(f"inst-{i:02d}", 0, "s", free_port()) for i in range(30)])
    wait_until(lambda: registered(target.url, "inst-29", 1), what="30 instances")
    unknown = httpx.post(f"{target.url}/pin", json={"instance_id": "x" * 200, "tokens": [1]})
    assert unknown.status_code == 404
    detail = unknown.json()["detail"]
    assert "(200 chars)" in detail and "and 10 more" in detail and len(detail) < 600
    huge = httpx.post(f"{target.url}/pin", json={"instance_id": "x" * 1_000_000, "tokens": [1]})
    assert huge.status_code == 422 and len(huge.text) < 1000


def test_a_worker_reporting_more_chunks_than_the_index_holds_fills_it_to_its_bound(
    tmp_path: Path,
) -> None:
    ctl = new_controller(tmp_path, "--max-indexed-chunks", "1000")
    ctl.start()
    try:
        with MonitorPeer(ctl.monitor_port) as attacker:
            attacker.send(register("hoarder", 0, "h", free_port()))
            keys = [ChunkKey(k) for k in range(5000)]
            attacker.send(mon.ChunkEvents("hoarder", 0, "h", [mon.ChunkOp(True, CPU, keys)]))
            attacker.send(register("probe", 0, "p", free_port()))  # read after the flood

        def counted() -> bool:
            metrics = httpx.get(f"{ctl.url}/metrics").text
            left_out = re.search(r"^lmc_controller_unindexed_chunks_total (\S+)$", metrics, re.M)
            return left_out is not None and float(left_out.group(1)) == 4000

        wait_until(counted, what="the chunks left out")
        metrics = httpx.get(f"{ctl.url}/metrics").text
        assert re.search(r"^lmc_controller_indexed_hashes 1000\.0$", metrics, re.M), metrics
        assert httpx.get(f"{ctl.url}/health").json()["status"] == "ok"
        assert "--max-indexed-chunks" in (tmp_path / "controller.log").read_text()
    finally:
        ctl.stop()
