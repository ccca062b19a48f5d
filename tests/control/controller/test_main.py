"""Bearer-token auth on and off, and a fast controller start without torch or vllm."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from lmc_connector.control.controller.settings import SettingsError, build_settings
from lmc_connector.launch import free_port
from tests.control.conftest import new_controller
from tests.control.harness import Controller

#: Makes `import torch` / `import vllm` fail in the controller process.
BLOCKER = """
import sys

class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "vllm"):
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, _Blocker())
"""


def test_api_key_is_required_when_set(tmp_path: Path) -> None:
    ctl = new_controller(tmp_path, "--api-key", "s3cret")
    ctl.env = {"LMC_CONTROLLER_API_KEY": "s3cret"}  # only for the harness's readiness probe
    ctl.start()
    try:
        refused = httpx.get(f"{ctl.url}/instances")
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
        assert refused.json() == {
            "detail": "missing or wrong API key: send 'Authorization: Bearer <api key>'",
            "event_id": None,
        }
        wrong = {"Authorization": "Bearer nope"}
        assert httpx.get(f"{ctl.url}/instances", headers=wrong).status_code == 401
        right = {"Authorization": "Bearer s3cret"}
        assert httpx.get(f"{ctl.url}/instances", headers=right).status_code == 200
    finally:
        ctl.stop()


def test_api_key_from_the_environment(tmp_path: Path) -> None:
    ctl = new_controller(tmp_path, env={"LMC_CONTROLLER_API_KEY": "from-env"})
    ctl.start()
    try:
        assert httpx.post(f"{ctl.url}/lookup", json={"tokens": [1]}).status_code == 401
        headers = {"Authorization": "Bearer from-env"}
        answer = httpx.post(f"{ctl.url}/lookup", json={"tokens": [1]}, headers=headers)
        assert answer.status_code == 200
    finally:
        ctl.stop()


def test_api_is_open_without_a_key(controller: Controller) -> None:
    assert httpx.get(f"{controller.url}/instances").status_code == 200


def test_controller_starts_and_answers_without_torch_or_vllm(tmp_path: Path) -> None:
    """The controller imports neither torch nor vLLM (nor the cache, which needs torch): it
    starts anywhere, fast (`benchmarks/controller.py` times its start-up)."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    probe = subprocess.run(
        [sys.executable, "-c", "import torch"],
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
    )
    assert probe.returncode != 0, "the import blocker is not active"
    ctl = new_controller(tmp_path, env={"PYTHONPATH": str(tmp_path)})
    ctl.start()
    ctl.stop()
    assert "blocked" not in (tmp_path / "controller.log").read_text()


def test_ctrl_c_stops_the_controller_cleanly_without_a_traceback(tmp_path: Path) -> None:
    ctl = new_controller(tmp_path)
    ctl.start()
    assert ctl.process is not None
    ctl.process.send_signal(signal.SIGINT)
    assert ctl.process.wait(timeout=10) == 0
    log = (tmp_path / "controller.log").read_text()
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log
    assert "controller stopped (interrupted)" in log


def test_config_file_settings_are_overridden_by_flags(tmp_path: Path) -> None:
    config = tmp_path / "controller.yaml"
    config.write_text("port: 9100\nmonitor_port: 9101\nworker_timeout: 3\n")
    settings = build_settings(["--config", str(config), "--port", "9200"], env={})
    assert (settings.port, settings.monitor_port, settings.worker_timeout) == (9200, 9101, 3.0)


def test_config_file_with_an_unknown_setting_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "controller.yaml"
    config.write_text("monitor_prot: 9101\n")
    with pytest.raises(SettingsError, match="did you mean monitor_port"):
        build_settings(["--config", str(config)], env={})


def run_controller(*args: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lmc_connector.control.controller", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("flag", ["--port", "--monitor-port"])
def test_a_taken_port_exits_at_once_with_the_same_one_line_message(flag: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"--port": str(free_port()), "--monitor-port": str(free_port()), flag: str(port)}
        started = time.monotonic()
        done = run_controller("--host", "127.0.0.1", *[x for kv in ports.items() for x in kv])
    assert time.monotonic() - started < 5
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "Errno" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert f"127.0.0.1:{port} ({flag})" in line and "already in use" in line
    assert f"choose another {flag}" in line


def test_lmcache_controller_flags_are_accepted() -> None:
    settings = build_settings(
        ["--monitor-ports", '{"pull": 8300, "reply": 8400}', "--lmcache-worker-timeout", "30"],
        env={},
    )
    assert (settings.monitor_port, settings.worker_timeout) == (8300, 30.0)
    assert build_settings(["--health-check-interval", "-1"], env={}) == build_settings([], env={})
    with pytest.raises(SettingsError, match='integer "pull" port'):
        build_settings(["--monitor-ports", '{"reply": 8400}'], env={})


def test_an_unknown_host_is_a_one_line_settings_error() -> None:
    done = run_controller("--host", "nosuchhost.invalid", "--port", str(free_port()))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--host" in lines[0] and "nosuchhost.invalid" in lines[0], lines


def test_reply_port_from_the_flag_or_lmcache_monitor_ports() -> None:
    assert build_settings(["--reply-port", "9002"], env={}).reply_port == 9002
    lmcache = build_settings(["--monitor-ports", '{"pull": 8300, "reply": 8400}'], env={})
    assert (lmcache.monitor_port, lmcache.reply_port) == (8300, 8400)
    assert build_settings([], env={}).reply_port is None
    with pytest.raises(SettingsError, match="must all differ"):
        build_settings(["--reply-port", "9001"], env={})
    with pytest.raises(SettingsError, match='integer "pull" port'):
        build_settings(["--monitor-ports", '{"push": 1}'], env={})
