"""Request size limits of the HTTP API: huge bodies and token lists get 413 naming the limit
and its flag before any work is done, and nobody else waits for them."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lmc_connector.control.controller.settings import SettingsError, build_settings
from tests.control.conftest import InstanceFactory, new_controller
from tests.control.harness import Controller

TEN_MILLION = b"[" + b",".join([b"1"] * 10_000_000) + b"]"


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Controller]:
    ctl = new_controller(
        tmp_path_factory.mktemp("strict"), "--max-tokens", "1000", "--max-body-bytes", "65536"
    )
    ctl.start()
    yield ctl
    ctl.stop()


def post_raw(url: str, body: bytes) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    return httpx.post(url, content=body, headers=headers, timeout=60)


@pytest.mark.parametrize("route", ["/lookup", "/pin", "/compress"])
def test_ten_million_tokens_are_refused_by_size_before_they_are_parsed(
    controller: Controller, route: str
) -> None:
    body = b'{"instance_id": "x", "method": "fp8", "location": "L", "tokens": ' + TEN_MILLION
    answer = post_raw(controller.url + route, body + b"}")
    assert answer.status_code == 413
    assert "16777216 bytes (lmc-controller --max-body-bytes)" in answer.json()["detail"]


def test_a_body_sent_in_chunks_is_cut_off_at_the_limit(strict: Controller) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is counted while reading
        yield b'{"tokens": ['
        for _ in range(10_000):
            yield b"1," * 1000
        yield b"1]}"

    answer = httpx.post(
        strict.url + "/lookup",
        content=chunks(),
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert answer.status_code == 413 and "--max-body-bytes" in answer.json()["detail"]


def test_more_tokens_than_the_limit_get_413_naming_its_flag(
    strict: Controller, make_instance: InstanceFactory
) -> None:
    make_instance("limits-a", world_size=1, target=strict)
    for route, body in (
        ("/lookup", {"tokens": list(range(1001))}),
        ("/pin", {"instance_id": "limits-a", "tokens": list(range(1001))}),
        ("/unpin", {"instance_id": "limits-a", "tokens": list(range(1001))}),
    ):
        answer = httpx.post(strict.url + route, json=body, timeout=10)
        assert answer.status_code == 413, answer.text
        detail = answer.json()["detail"]
        assert "1001 token ids exceed the limit of 1000 (lmc-controller --max-tokens)" in detail
    answer = httpx.post(strict.url + "/pin", json={"instance_id": "limits-a", "tokens": [1] * 1000})
    assert answer.status_code == 200


def test_a_million_worker_ids_are_refused_without_holding_the_controller(
    controller: Controller, make_instance: InstanceFactory
) -> None:
    make_instance("limits-b", world_size=1)
    body = b'{"instance_id": "limits-b", "worker_ids": [' + b",".join([b"0"] * 1_000_000) + b"]}"
    answers: list[int] = []
    health = threading.Thread(
        target=lambda: answers.extend(
            httpx.get(f"{controller.url}/health", timeout=10).status_code for _ in range(5)
        )
    )
    health.start()
    refused = post_raw(controller.url + "/query_worker_info", body)
    health.join()
    assert refused.status_code == 422 and "worker_ids" in refused.json()["detail"]
    assert answers == [200] * 5


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--api-key", ""], {}, "--api-key is empty"),
        (["--api-key", "  "], {}, "--api-key is empty"),
        ([], {"LMC_CONTROLLER_API_KEY": ""}, "LMC_CONTROLLER_API_KEY is empty"),
        (["--max-tokens", "0"], {}, "max_tokens=0"),
        (["--max-body-bytes", "10"], {}, "max_body_bytes=10"),
        (["--max-indexed-chunks", "0"], {}, "max_indexed_chunks=0"),
        (["--ssl-certfile", "cert.pem"], {}, "both --ssl-certfile and --ssl-keyfile"),
    ],
)
def test_settings_that_cannot_work_are_start_up_errors(
    argv: list[str], env: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError, match=message):
        build_settings(argv, env=env)


def test_an_empty_api_key_stops_the_controller_with_the_fix(tmp_path: Path) -> None:
    for args, env in ((["--api-key", ""], {}), ([], {"LMC_CONTROLLER_API_KEY": ""})):
        done = subprocess.run(
            [sys.executable, "-m", "lmc_connector.control.controller", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **env},
        )
        assert done.returncode == 2 and "is empty: give a key" in done.stderr
