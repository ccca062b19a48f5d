"""`lmc-admin` subcommands and exit codes against a real controller."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from lmc_connector.control.admin.cli import main
from lmc_connector.launch import free_port
from tests.control.conftest import InstanceFactory
from tests.control.harness import CPU, Controller, wait_until

PROMPT = list(range(700, 710))


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
    script = Path(sys.executable).with_name("lmc-admin")
    result = subprocess.run(
        [str(script), "--url", controller.url, "worker-info", "--instance", "missing"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "unknown instance_id" in result.stderr
