"""The seed page (compress and decompress the KV cache) against a real vLLM on the CPU.

One controller and one vLLM server serve the whole module; the steps run once
(the `report` fixture) and each test checks one promise of the page. The model
is the walk-through's own, the small trained Llama (trained once per checkout,
about two minutes, then reused from `.models/`), so its answers are words.
"""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from examples import walkthrough
from examples.walkthrough import Ports, Report, Walkthrough
from lmc_connector import launch as services

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

METHOD = "cachegen"
LOCATION = "LocalCPUBackend"


@pytest.fixture(scope="module")
def running(
    trained_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Walkthrough, list[services.Service]]]:
    log_dir = tmp_path_factory.mktemp("walkthrough")
    ports = Ports.free()
    config = walkthrough.config_for_ports(
        walkthrough.ROOT / "examples/example.yaml", ports, log_dir
    )
    with walkthrough.started(trained_model_dir, config, ports, log_dir, "trained") as started:
        yield started


@pytest.fixture(scope="module")
def flow(running: tuple[Walkthrough, list[services.Service]]) -> Walkthrough:
    return running[0]


@pytest.fixture(scope="module")
def report(flow: Walkthrough) -> Report:
    return walkthrough.run_steps(flow, METHOD, LOCATION)


@pytest.fixture(scope="module")
def tokens(report: Report, flow: Walkthrough) -> list[int]:
    return flow.tokenize()


def post(flow: Walkthrough, route: str, **body: Any) -> httpx.Response:
    return flow.http.post(f"{flow.controller_url}/{route}", json=body)


def test_compress_schedules_every_prompt_token(report: Report) -> None:
    assert report.num_tokens > 0
    assert report.scheduled["compress"] == report.num_tokens


def test_decompress_schedules_every_prompt_token(report: Report) -> None:
    assert report.scheduled["decompress"] == report.num_tokens


def test_both_events_finish_with_their_own_ids(report: Report) -> None:
    events = [report.events["compress"], report.events["decompress"]]
    assert [e["status"] for e in events] == ["finished", "finished"]
    assert events[0]["event_id"] != events[1]["event_id"]


def test_compression_shrinks_the_cached_kv(report: Report) -> None:
    before = walkthrough._bytes(report.events["compress"], "bytes_before")
    after = walkthrough._bytes(report.events["compress"], "bytes_after")
    assert 0 < after < before / 3


def test_request_after_compress_is_served_from_the_cache(report: Report) -> None:
    assert report.cached_tokens[1] > 0


def test_request_after_decompress_is_served_from_the_cache(report: Report) -> None:
    assert report.cached_tokens[2] > 0


def test_compressed_and_decompressed_caches_give_identical_outputs(report: Report) -> None:
    assert report.outputs[1] == report.outputs[2]


def test_every_answer_is_words(report: Report) -> None:
    assert report.expect_words
    assert all(walkthrough.is_words(text) for text in report.outputs), report.outputs


def test_the_report_finds_no_broken_promise(report: Report) -> None:
    assert walkthrough.check(report) == []


def test_unknown_instance_is_rejected_naming_the_known_ones(
    flow: Walkthrough, tokens: list[int]
) -> None:
    answer = post(flow, "compress", instance_id="nope", method=METHOD, location=LOCATION,
                  tokens=tokens)  # fmt: skip
    assert answer.status_code == 404
    assert walkthrough.INSTANCE_ID in answer.text


def test_unknown_method_is_rejected_naming_the_valid_ones(
    flow: Walkthrough, tokens: list[int]
) -> None:
    answer = post(flow, "compress", instance_id=walkthrough.INSTANCE_ID, method="cachegn",
                  location=LOCATION, tokens=tokens)  # fmt: skip
    assert 400 <= answer.status_code < 500
    assert "cachegen" in answer.text and "fp8" in answer.text


def test_unknown_location_is_rejected_naming_the_valid_ones(
    flow: Walkthrough, tokens: list[int]
) -> None:
    answer = post(flow, "decompress", instance_id=walkthrough.INSTANCE_ID, method=METHOD,
                  location="LocalGPUBackend", tokens=tokens)  # fmt: skip
    assert 400 <= answer.status_code < 500
    assert LOCATION in answer.text


@pytest.mark.parametrize("bad_tokens", ["12 13", [1, "x"], [-5]])
def test_malformed_tokens_are_rejected(flow: Walkthrough, bad_tokens: object) -> None:
    answer = post(flow, "compress", instance_id=walkthrough.INSTANCE_ID, method=METHOD,
                  location=LOCATION, tokens=bad_tokens)  # fmt: skip
    assert answer.status_code in (400, 422)
    assert "tokens" in answer.text


def test_both_servers_are_still_up_afterwards(
    report: Report, running: tuple[Walkthrough, list[services.Service]]
) -> None:
    flow, started = running
    assert all(s.alive() for s in started)
    assert httpx.get(f"{flow.vllm_url}/health", timeout=10).status_code == 200
    assert flow.http.post(f"{flow.controller_url}/health", json={}).status_code == 200
