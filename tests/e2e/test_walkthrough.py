"""The main job, run as a user runs it: the seed page against a real vLLM on the CPU.

`python -m examples.walkthrough` runs once for the module (its own controller
and vLLM, free ports, the small trained model) and writes its report as JSON;
each test checks one promise of the seed page in it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.models.builder import ROOT

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def report(trained_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("walkthrough")
    out = folder / "report.json"
    command = [sys.executable, "-m", "examples.walkthrough", "--free-ports"]
    command += ["--model", str(trained_model_dir), "--log-dir", str(folder / "logs")]
    command += ["--report-json", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "all steps of the seed page passed" in done.stdout
    return dict(json.loads(out.read_text()))


def bytes_of(event: dict[str, Any], key: str) -> int:
    return sum(int(worker[key]) for worker in event["workers"])


def test_compress_and_decompress_schedule_every_prompt_token(report: dict[str, Any]) -> None:
    assert report["num_tokens"] > 0
    assert report["scheduled"] == {
        "compress": report["num_tokens"],
        "decompress": report["num_tokens"],
    }


def test_both_operations_finish_with_their_own_ids(report: dict[str, Any]) -> None:
    events = [report["events"]["compress"], report["events"]["decompress"]]
    assert [e["status"] for e in events] == ["finished", "finished"]
    assert events[0]["event_id"] != events[1]["event_id"]


def test_compression_shrinks_the_cached_kv(report: dict[str, Any]) -> None:
    compress = report["events"]["compress"]
    assert 0 < bytes_of(compress, "bytes_after") < bytes_of(compress, "bytes_before") / 3


def test_requests_after_compress_and_decompress_are_served_from_the_cache(
    report: dict[str, Any],
) -> None:
    first, compressed, decompressed = report["cached_tokens"]
    assert first == 0 and compressed > 0 and decompressed > 0


def test_compressed_and_decompressed_caches_give_the_same_answer_in_words(
    report: dict[str, Any],
) -> None:
    assert report["expect_words"]
    assert report["outputs"][1] == report["outputs"][2]
    assert report["problems"] == []


def test_every_mistake_gets_a_4xx_that_names_the_fix(report: dict[str, Any]) -> None:
    mistakes = report["mistakes"]
    assert mistakes["unknown instance"][0] == 404
    assert "lmcache_default_instance" in mistakes["unknown instance"][1]
    assert mistakes["misspelled method"][0] == 400
    assert "did you mean cachegen" in mistakes["misspelled method"][1]
    assert mistakes["unknown location"][0] == 400
    assert "LocalCPUBackend" in mistakes["unknown location"][1]
