"""Two vLLM instances and one controller: a prompt computed on A is served from cache on B.

A is vLLM's OpenAI server; B is an in-process `LLM` in a child process (`peer_child.py`)
with the probe that records the KV it loads and saves. The child runs every step once and
the tests each check one promise:

* B serves A's prompt through the peer (an asynchronous load): cached tokens, the same
  output as A, and KV bit-identical to what B computes itself when nothing is cached;
* A's chunks compressed with cachegen reach B compressed, byte for byte as A stores them;
* `/move` in LMCache's shape from A to B finishes, with copy and without;
* A killed with a prompt cached (and still listed by the controller): B recomputes and
  answers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from examples import child_result
from lmc_connector import launch as services
from tests.v1.test_llm import BLOCK
from tests.vllm_server import vllm_server

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
PROMPT_LEN = 300
FULL_BLOCKS = PROMPT_LEN // BLOCK * BLOCK


@pytest.fixture(scope="module")
def seen(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    logs = tmp_path_factory.mktemp("peers")
    port, monitor, reply = (services.free_port() for _ in range(3))
    url = f"http://127.0.0.1:{port}"
    command = [*services.controller_command("127.0.0.1", port, monitor), "--reply-port",
               str(reply), "--worker-timeout", "60"]  # fmt: skip
    config = logs / "a.yaml"
    config.write_text(
        "chunk_size: 64\nenable_controller: true\nlmcache_instance_id: A\n"
        f"controller_pull_url: 127.0.0.1:{monitor}\ncontroller_reply_url: 127.0.0.1:{reply}\n"
        f"lmcache_worker_ports: {services.free_port()}\nenable_p2p: true\n"
        f"p2p_init_ports: {services.free_port()}\ncontroller_heartbeat_interval: 0.5\n"
    )
    connector = json.dumps(services.CONNECTOR_CONFIG)
    args = ("--kv-transfer-config", connector, "--no-enable-prefix-caching", "--dtype", "float32",
            "--served-model-name", str(tiny_model_dir))  # fmt: skip
    env = {"LMCACHE_CONFIG_FILE": str(config)}
    with (
        services.running("lmc-controller", command, url, logs / "controller.log", timeout=30),
        vllm_server(tiny_model_dir, *args, env=env, log_path=logs / "a.log") as a,
    ):
        child_env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        child = [sys.executable, "-m", "tests.v1.peer_child", str(tiny_model_dir), url,
                 str(monitor), str(reply), a.url, str(a.process.pid)]  # fmt: skip
        proc = subprocess.run(child, cwd=ROOT, env=child_env, capture_output=True, text=True,
                              timeout=900)  # fmt: skip
    (logs / "b.log").write_text(proc.stderr)
    (logs / "b.stdout.log").write_text(proc.stdout)
    result = child_result.parse(proc.stdout)
    assert result is not None, (
        f"instance B failed ({proc.returncode}), log {logs / 'b.log'}:\n{proc.stderr[-4000:]}"
    )
    yield result


def kv(record: list[Any]) -> torch.Tensor:
    _, shape, data = record
    return torch.frombuffer(bytearray.fromhex(data), dtype=torch.float32).reshape(shape)


def test_prompt_computed_on_a_is_served_from_cache_on_b(seen: dict[str, Any]) -> None:
    assert seen["a_held"]
    assert seen["b_cached"] == PROMPT_LEN - 1
    assert seen["b_text"] == seen["a_text"]


def test_kv_fetched_from_a_is_bit_identical_to_recompute_on_b(seen: dict[str, Any]) -> None:
    assert seen["recompute_cached"] == 0
    assert seen["recompute_text"] == seen["a_text"]
    # What B's blocks held after the step that completed each prompt (the probe gathers them
    # after every save): fetched KV for all but the last token, then everything recomputed.
    fetched, recomputed = (
        kv(next(r for r in seen[run] if r[0] == "save")) for run in ("loaded", "saved")
    )
    assert fetched.shape[2] == recomputed.shape[2] == PROMPT_LEN
    assert torch.equal(fetched[:, :, :FULL_BLOCKS], recomputed[:, :, :FULL_BLOCKS])


def test_compressed_chunks_reach_b_compressed_as_stored(seen: dict[str, Any]) -> None:
    event = seen["compress"]
    assert event["status"] == "finished", event
    assert seen["b_compressed_cached"] == PROMPT_LEN - 1
    methods = {method for method, _ in seen["b_chunks"]}
    assert methods == {"cachegen"}
    assert sum(size for _, size in seen["b_chunks"]) == event["workers"][0]["bytes_after"]


@pytest.mark.parametrize("copy", [True, False])
def test_move_in_lmcache_shape_finishes_and_b_serves_the_prompt(
    seen: dict[str, Any], copy: bool
) -> None:
    step = seen[f"move_copy_{copy}"]
    assert step["answer"]["num_tokens"] == PROMPT_LEN
    assert step["event"]["status"] == "finished", step["event"]
    assert step["lookup"]["B"] == ["LocalCPUBackend", PROMPT_LEN]
    assert ("A" in step["lookup"]) == copy
    assert step["b_cached"] == PROMPT_LEN - 1


def test_a_dead_peer_is_a_miss_and_b_still_answers(seen: dict[str, Any]) -> None:
    dead = seen["dead_peer"]
    assert dead["cached"] == 0
    assert dead["text"] == seen["a_text_p3"]
