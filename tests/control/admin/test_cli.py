"""`lmc-admin` subcommands and exit codes against a real controller."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

from lmc_connector.control.admin.cli import main, parser
from lmc_connector.launch import free_port
from tests.control.conftest import InstanceFactory
from tests.control.harness import CPU, Controller, sigint_as_at_a_terminal, wait_until

PROMPT = list(range(700, 710))
SCRIPT = Path(sys.executable).with_name("lmc-admin")


def admin(controller: Controller, *args: str) -> int:
    return main(["--url", controller.url, *args])


class FakeVllm(BaseHTTPRequestHandler):
    """vLLM's /v1/models and /tokenize (each character of the prompt becomes its code point)."""

    def do_GET(self) -> None:
        self._send({"data": [{"id": "tiny"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert body["model"] == "tiny"
        self._send({"count": len(body["prompt"]), "tokens": [ord(c) for c in body["prompt"]]})

    def _send(self, data: object) -> None:
        payload = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def vllm_url() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), FakeVllm)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_compress_wait_follows_the_event_and_exits_0(
    controller: Controller, make_instance: InstanceFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    for w in make_instance("cli-a"):
        w.fill(PROMPT)
    tokens = ",".join(map(str, PROMPT))
    code = admin(
        controller, "--json", "compress", "--instance", "cli-a", "--tokens", tokens, "--wait"
    )
    assert code == 0
    assert json.loads(capsys.readouterr().out)["status"] == "finished"


def test_calibrate_wait_shows_each_workers_calibration_then_kvtc_compresses(
    controller: Controller, make_instance: InstanceFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    prompt = list(range(700, 740))  # 40 tokens: enough to fit on (16 needed)
    for w in make_instance("cli-cal"):
        w.fill(prompt, seed=w.engine.layout.rank)
    tokens = ",".join(map(str, prompt))
    compress = ("compress", "--instance", "cli-cal", "--method", "kvtc", "--tokens", tokens)
    assert admin(controller, *compress) == 2  # 409: calibrate first
    assert "lmc-admin calibrate --instance cli-cal" in capsys.readouterr().err
    assert admin(controller, "calibrate", "--instance", "cli-cal", "--wait") == 0
    out = capsys.readouterr().out
    assert re.search(r"^kind:\s+calibrate$", out, re.M)
    assert re.search(r"^method:\s+kvtc$", out, re.M)
    rows = re.findall(r"^\d\s+finished\s.*\s[0-9a-f]{32}$", out, re.M)
    assert "CALIBRATION" in out and len(rows) == 2, out
    assert admin(controller, "--json", *compress, "--wait") == 0
    assert json.loads(capsys.readouterr().out)["status"] == "finished"
    assert admin(controller, "workers", "--instance", "cli-cal", "-o", "wide") == 0
    assert "kvtc:" in capsys.readouterr().out


def test_prompt_is_tokenized_through_vllm(
    controller: Controller,
    make_instance: InstanceFactory,
    vllm_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    prompt = "hello world!"
    for w in make_instance("cli-prompt"):
        w.fill([ord(c) for c in prompt])

    def found() -> bool:
        capsys.readouterr()
        assert (
            admin(controller, "--json", "lookup", "--prompt", prompt, "--vllm-url", vllm_url) == 0
        )
        return json.loads(capsys.readouterr().out)["layout_info"].get("cli-prompt") == [CPU, 12]

    wait_until(found, what="the prompt's chunks in the index")


def test_tokens_file_accepts_a_tokenize_answer(
    controller: Controller, make_instance: InstanceFactory, tmp_path: Path
) -> None:
    make_instance("cli-file")
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"count": 3, "tokens": [1, 2, 3]}))
    assert admin(controller, "pin", "--instance", "cli-file", "--tokens-file", str(path)) == 0


def test_unknown_instance_exits_2(controller: Controller) -> None:
    assert admin(controller, "clear", "--instance", "missing") == 2


def test_bad_tokens_exit_2(controller: Controller) -> None:
    assert admin(controller, "lookup", "--tokens", "1,two") == 2


def test_unreachable_controller_exits_3() -> None:
    assert main(["--url", f"http://127.0.0.1:{free_port()}", "instances"]) == 3


def test_wrong_api_key_exits_4(tmp_path: Path) -> None:
    from tests.control.conftest import new_controller

    ctl = new_controller(tmp_path, "--api-key", "k")
    ctl.env = {"LMC_CONTROLLER_API_KEY": "k"}
    ctl.start()
    try:
        assert main(["--url", ctl.url, "--api-key", "wrong", "instances"]) == 4
        assert main(["--url", ctl.url, "--api-key", "k", "instances"]) == 0
    finally:
        ctl.stop()


def test_console_script_prints_one_line_errors(controller: Controller) -> None:
    result = subprocess.run(
        [str(SCRIPT), "--url", controller.url, "worker-info", "--instance", "missing"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "unknown instance_id" in result.stderr


# -- output, flags and help -------------------------------------------------------------------


def test_instances_prints_a_table(
    controller: Controller, make_instance: InstanceFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    make_instance("cli-table")
    assert admin(controller, "instances") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "INSTANCE",
        "MODEL",
        "WORKERS",
        "CHUNK",
        "SIZE",
        "CHUNKS",
        "LOCATIONS",
    ]
    row = next(line for line in lines if line.startswith("cli-table"))
    assert row.split()[:4] == ["cli-table", "tiny", "2/2", "4"]
    assert "{" not in "".join(lines) and "None" not in "".join(lines)


def test_wide_worker_table_shows_dates_not_epoch_floats(
    controller: Controller, make_instance: InstanceFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    make_instance("cli-wide")
    assert admin(controller, "worker-info", "--instance", "cli-wide", "-o", "wide") == 0
    out = capsys.readouterr().out
    assert "REGISTERED" in out and "PEER" in out
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", out)
    assert not re.search(r"\d{10}\.\d", out)


def test_global_flags_work_after_the_subcommand(
    controller: Controller, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["health", "--json", "--url", controller.url]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "ok"
    assert main(["health", "--url", controller.url, "-o", "yaml"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["status"] == "ok"


def test_help_shows_defaults_and_version_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    top = parser().format_help()
    assert "(default: http://127.0.0.1:9000)" in top and "(default: table)" in top
    with pytest.raises(SystemExit) as done:
        main(["compress", "--help"])
    assert done.value.code == 0
    sub = capsys.readouterr().out
    assert "(default: cachegen)" in sub and "(default: LocalCPUBackend)" in sub
    with pytest.raises(SystemExit):
        main(["--version"])
    assert re.match(r"lmc-admin \d+\.\d+", capsys.readouterr().out)


def test_health_strict_exits_6_when_degraded(controller: Controller) -> None:
    from lmc_connector.launch import free_port
    from tests.control.harness import engine_config, registered, start_worker

    config = engine_config(controller.monitor_port, "cli-half", [free_port(), free_port()])
    worker = start_worker(config, rank=0, world_size=2)  # rank 1 never comes
    try:
        wait_until(lambda: registered(controller.url, "cli-half", 1), what="rank 0")
        assert admin(controller, "health", "--instance", "cli-half") == 0
        assert admin(controller, "health", "--instance", "cli-half", "--strict") == 6
        assert admin(controller, "health", "--strict") == 0
    finally:
        worker.agent.close()


@pytest.mark.parametrize(
    "page",
    [
        (200, "text/html", b"<html><body>hello</body></html>"),
        (404, "application/json", b'{"detail":"Not Found"}'),
    ],
)
def test_a_url_that_is_not_a_controller_gets_one_line(page: tuple[int, str, bytes]) -> None:
    status, media, payload = page

    class Other(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Type", media)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Other)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = subprocess.run(
            [str(SCRIPT), "--url", f"http://127.0.0.1:{server.server_address[1]}", "instances"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        server.shutdown()
    assert result.returncode == 3
    assert result.stdout == ""
    assert (
        result.stderr.count("\n") == 1 and "does not look like an lmc-controller" in result.stderr
    )


# -- waiting: progress, timeouts, Ctrl-C -------------------------------------------------------


@pytest.fixture
def stuck_instance(make_instance: InstanceFactory) -> Iterator[str]:
    """An instance whose compress jobs never end until the test does.

    A fake: a job that outlasts the wait cannot be caused reliably on a tiny cache.
    """
    release = threading.Event()
    workers = make_instance("cli-stuck")
    for w in workers:
        w.fill(PROMPT)

        def blocked(job: object) -> object:
            release.wait(60)
            return job

        w.engine.run = blocked
    yield "cli-stuck"
    release.set()


def test_wait_timeout_exits_5_and_json_still_prints_the_last_state(
    controller: Controller, stuck_instance: str, capsys: pytest.CaptureFixture[str]
) -> None:
    tokens = ",".join(map(str, PROMPT))
    args = ["compress", "--instance", stuck_instance, "--tokens", tokens, "--wait"]
    assert admin(controller, *args, "--wait-timeout", "0.5", "-o", "json") == 5
    captured = capsys.readouterr()
    event = json.loads(captured.out)
    assert event["status"] == "running"
    (line,) = captured.err.splitlines()
    assert f"event {event['event_id']} --wait" in line and "\r" not in captured.err


def test_ctrl_c_prints_how_to_resume_and_exits_130(
    controller: Controller, stuck_instance: str
) -> None:
    tokens = ",".join(map(str, PROMPT))
    args = ["--url", controller.url, "compress", "--instance", stuck_instance, "--tokens", tokens]
    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        [str(SCRIPT), *args, "--wait"],
        stdout=subprocess.PIPE,
        stderr=secondary,
        env={**os.environ, "TERM": "xterm", "COLUMNS": "200"},
        preexec_fn=sigint_as_at_a_terminal,
    )
    os.close(secondary)
    seen = b""

    def progress_shown() -> bool:
        nonlocal seen
        while select.select([primary], [], [], 0.05)[0]:
            seen += os.read(primary, 4096)
        return b"chunks done" in seen

    try:
        wait_until(progress_shown, what="the progress line on the terminal")
        assert re.search(rb"\d:\d\d:\d\d", seen), seen  # elapsed time
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 130
        while select.select([primary], [], [], 0.2)[0]:
            try:
                seen += os.read(primary, 4096)
            except OSError:
                break
    finally:
        if process.poll() is None:
            process.kill()
        os.close(primary)
    text = seen.decode(errors="replace")
    assert "interrupted" in text and re.search(r"event [0-9a-f]{32} --wait", text), text
    assert "Traceback" not in text


def test_a_salted_or_adapted_prompt_is_named_by_its_options(
    controller: Controller, make_instance: InstanceFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    from lmc_connector.tokens import KeyScope

    (worker,) = make_instance("cli-scoped", world_size=1)
    worker.fill(PROMPT, scope=KeyScope(cache_salt="tenant-a"))
    worker.fill(PROMPT[:8], scope=KeyScope(lora_name="sql", lora_path="/adapters/sql"))
    tokens = ",".join(map(str, PROMPT))

    def cached(*scope: str) -> object:
        capsys.readouterr()
        assert admin(controller, "--json", "lookup", "--tokens", tokens, *scope) == 0
        return json.loads(capsys.readouterr().out)["layout_info"]

    assert wait_until(lambda: cached("--cache-salt", "tenant-a"), what="indexed") == {
        "cli-scoped": [CPU, 10]
    }
    assert cached() == {}
    adapter = ("--lora-name", "sql", "--lora-path", "/adapters/sql")
    assert cached(*adapter) == {"cli-scoped": [CPU, 8]}
    pin = ("--json", "pin", "--instance", "cli-scoped", "--tokens", tokens)
    assert admin(controller, *pin, "--cache-salt", "tenant-a") == 0
    assert json.loads(capsys.readouterr().out)["num_tokens"] == 10
    compress = ("compress", "--instance", "cli-scoped", "--tokens", tokens, "--wait")
    assert admin(controller, "--json", *compress, *adapter) == 0
    assert json.loads(capsys.readouterr().out)["num_tokens"] == 8
    assert admin(controller, "compress", "--instance", "cli-scoped", "--all", *adapter) == 2


def test_operations_lists_the_recent_ones_newest_first(
    controller: Controller, make_instance: InstanceFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    make_instance("cli-ops", world_size=1)
    assert admin(controller, "--json", "clear", "--instance", "cli-ops") == 0
    cleared = json.loads(capsys.readouterr().out)["event_id"]
    assert admin(controller, "--json", "operations", "--limit", "1") == 0
    (newest,) = json.loads(capsys.readouterr().out)["operations"]
    assert (newest["event_id"], newest["kind"]) == (cleared, "clear")
    assert admin(controller, "operations") == 0
    table = capsys.readouterr().out
    assert cleared in table and "EVENT" in table and "clear" in table
    assert admin(controller, "operations", "--limit", "0") == 2
