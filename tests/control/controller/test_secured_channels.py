"""With a shared secret, only its holders take part: a controller and real agents over CURVE,
and peers without the secret on the monitor and command ports. Without a secret, nothing
listens beyond loopback unless asked to, loudly."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import zmq

from lmc_connector.config import ConfigError
from lmc_connector.control.agent import link
from lmc_connector.control.wire import commands as cmd
from lmc_connector.control.wire import peer as pw
from lmc_connector.control.wire.codec import encode
from lmc_connector.control.wire.rpc import RpcClient, RpcError
from lmc_connector.control.wire.security import ChannelSecurity
from lmc_connector.launch import free_port
from tests.control.conftest import InstanceFactory, new_controller
from tests.control.harness import (
    CPU,
    Controller,
    engine_config,
    registered,
    start_worker,
    wait_until,
)
from tests.control.peers import MonitorPeer, heartbeat, job_done, register

PROMPT = list(range(500, 512))
SECRET = b"a-secret-shared-by-controller-and-workers"
WRONG = ChannelSecurity(b"a-secret-of-somebody-else-entirely")


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "lmc.secret"
    path.write_bytes(SECRET + b"\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, secret_file: Path) -> Iterator[Controller]:
    ctl = new_controller(tmp_path_factory.mktemp("secured"), "--secret-file", str(secret_file))
    ctl.start()
    yield ctl
    ctl.stop()


def instances(ctl: Controller) -> list[tuple[str, list[tuple[int, str]]]]:
    """Who is registered: instance ids with (rank, session) of each worker."""
    data = httpx.get(f"{ctl.url}/instances", timeout=5).json()["instances"]
    return sorted(
        (i["instance_id"], [(w["worker_id"], w["session"]) for w in i["workers"]]) for i in data
    )


def test_workers_holding_the_secret_register_and_run_commands(
    secured: Controller, make_instance: InstanceFactory, secret_file: Path
) -> None:
    workers = make_instance("curve-a", target=secured, control_secret_file=str(secret_file))
    for w in workers:
        w.fill(PROMPT)
        assert w.agent._reporter.acknowledged
    body = {"instance_id": "curve-a", "method": "fp8", "location": CPU, "tokens": PROMPT}
    answer = httpx.post(f"{secured.url}/compress", json=body, timeout=10)
    assert answer.status_code == 200, answer.text
    event_id = answer.json()["event_id"]
    wait_until(
        lambda: httpx.get(f"{secured.url}/events/{event_id}").json()["status"] == "finished",
        what="the compress to finish",
    )
    assert all(workers[0].encoded(PROMPT))


def test_forged_reports_without_the_secret_change_nothing(
    secured: Controller, make_instance: InstanceFactory, secret_file: Path
) -> None:
    (victim,) = make_instance(
        "curve-b", world_size=1, target=secured, control_secret_file=str(secret_file)
    )
    victim.fill(PROMPT)
    session = victim.agent.spec.session
    before = instances(secured)
    for security in (ChannelSecurity(), WRONG):
        with MonitorPeer(secured.monitor_port, security) as attacker:
            attacker.send(
                register("curve-b", 0, "evil", free_port()),  # take over rank 0
                register("curve-b", 1, "evil", free_port(), world_size=2),  # reshape it
                register("intruder", 0, "evil", free_port()),
                job_done("curve-b", 0, session, "0" * 32),
                *[heartbeat("ghost", 0, f"g{i}", 20000 + i) for i in range(200)],
                b"\xff garbage",
            )
    with MonitorPeer(secured.monitor_port, ChannelSecurity(SECRET)) as holder:
        holder.send(register("holder-probe", 0, "fine", free_port()))  # sent after the forgeries
    wait_until(lambda: registered(secured.url, "holder-probe", 1), what="the probe to register")
    assert [i for i in instances(secured) if i[0] != "holder-probe"] == before
    metrics = httpx.get(f"{secured.url}/metrics").text
    assert "lmc_controller_malformed_messages_total 0" in metrics  # no forged byte was read
    answer = httpx.post(f"{secured.url}/pin", json={"instance_id": "curve-b", "tokens": PROMPT})
    assert answer.status_code == 200 and answer.json()["num_tokens"] == 12


def test_commands_without_the_secret_get_no_answer_and_change_nothing(
    secured: Controller, make_instance: InstanceFactory, secret_file: Path
) -> None:
    (victim,) = make_instance(
        "curve-c", world_size=1, target=secured, control_secret_file=str(secret_file)
    )
    victim.fill(PROMPT)
    address = f"tcp://127.0.0.1:{victim.agent.spec.port}"
    for security in (ChannelSecurity(), WRONG):
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        client = RpcClient(context, "attacker", security)
        client.start()
        try:
            for command in (
                cmd.Prepare("e1", cmd.ClearOp(), 5.0),
                cmd.Commit("e1"),
                cmd.Resync(),
            ):
                with pytest.raises(RpcError):  # no answer, or nowhere to send it
                    client.call(address, [encode(command)], 0.5)
        finally:
            client.close()
            context.term()
    assert victim.engine.lookup(PROMPT) == 12
    assert not victim.agent._executor._prepared


def test_the_peer_port_serves_only_holders_of_the_secret(
    secured: Controller, make_instance: InstanceFactory, secret_file: Path
) -> None:
    (victim,) = make_instance(
        "curve-p",
        world_size=1,
        target=secured,
        control_secret_file=str(secret_file),
        enable_p2p=True,
        controller_reply_url=f"127.0.0.1:{free_port()}",  # not asked here
        p2p_init_ports=[],
    )
    victim.fill(PROMPT)
    keys = victim.engine.hashes(PROMPT)
    layout = victim.engine.layout.instance_fingerprint()
    address = f"tcp://127.0.0.1:{victim.agent.spec.peer_port}"
    fetch = encode(pw.Fetch(layout, keys))
    drop = encode(pw.Drop(layout, keys, CPU))

    def ask(security: ChannelSecurity, request: bytes) -> pw.Chunks | None:
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        client = RpcClient(context, "peer", security)
        client.start()
        try:
            return pw.chunks_decoder().decode(client.call(address, [request], 1.0)[0].buffer)
        except RpcError:
            return None
        finally:
            client.close()
            context.term()

    for security in (ChannelSecurity(), WRONG):
        assert ask(security, fetch) is None and ask(security, drop) is None
    assert victim.engine.lookup(PROMPT) == 12  # nothing dropped
    answer = ask(ChannelSecurity(SECRET), fetch)
    assert answer is not None and len(answer.chunks) == len(keys)


def test_a_worker_without_the_secret_is_not_registered_and_says_what_to_check(
    secured: Controller,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(link, "UNREACHABLE_WARN_S", 0.3)
    config = engine_config(secured.monitor_port, "curve-d", [free_port()])
    with caplog.at_level(logging.WARNING, logger="lmc_connector.control.agent"):
        worker = start_worker(config, 0, 1)
        try:
            wait_until(
                lambda: "control_secret_file must hold the secret" in caplog.text,
                what="the worker's warning",
            )
            assert not registered(secured.url, "curve-d", 1)
        finally:
            worker.agent.close()


def test_without_a_secret_the_controller_listens_on_loopback_only(tmp_path: Path) -> None:
    ports = ["--port", str(free_port()), "--monitor-port", str(free_port())]
    refused = subprocess.run(
        [sys.executable, "-m", "lmc_connector.control.controller", "--host", "0.0.0.0", *ports],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    assert "--secret-file" in refused.stderr and "--insecure" in refused.stderr
    ctl = new_controller(tmp_path, "--host", "0.0.0.0", "--insecure")
    ctl.start()
    try:
        assert ctl.log is not None
        log = ctl.log.read_text()
        assert "WITHOUT authentication" in log and "has no --api-key" in log
    finally:
        ctl.stop()


def test_without_a_secret_a_worker_listens_on_loopback_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def start(**extra: Any) -> Any:
        config = engine_config(free_port(), "wide", [free_port()], **extra)
        return start_worker(config, 0, 1)

    with pytest.raises(ConfigError, match="control_secret_file"):
        start(lmcache_worker_host="0.0.0.0")
    with caplog.at_level(logging.WARNING, logger="lmc_connector.control.wire.security"):
        worker = start(lmcache_worker_host="0.0.0.0", control_insecure=True)
    worker.agent.close()
    assert "WITHOUT authentication" in caplog.text
