"""Tensor parallelism: each rank caches its own KV shard and runs its own control agent.

One child process runs vLLM with `tensor_parallel_size=2` on the CPU (one core
per rank) against a real controller and a real Redis (each rank's shard under
its own layout in the store), and at the end calibrates kvtc on each rank's
cached KV and serves a prompt from kvtc chunks; the tests read what it saw.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from examples import child_result
from lmc_connector import launch as services
from lmc_connector.launch import Service

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _free_port_pair() -> int:
    """A free port P whose neighbour P + 1 (rank 1's command port) is free too."""
    for _ in range(100):
        port = services.free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two free neighbouring ports")


@pytest.fixture(scope="module")
def seen(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, redis_server: Service
) -> Iterator[dict[str, Any]]:
    logs = tmp_path_factory.mktemp("tp2")
    port, monitor, worker = services.free_port(), services.free_port(), _free_port_pair()
    url = f"http://127.0.0.1:{port}"
    command = services.controller_command("127.0.0.1", port, monitor)
    with services.running("lmc-controller", command, url, logs / "controller.log", timeout=30):
        env = {
            **os.environ,
            "VLLM_CPU_OMP_THREADS_BIND": "0|1",
            "PYTHONPATH": str(ROOT),
            "HF_HUB_OFFLINE": "1",
        }
        child = [sys.executable, "-m", "tests.v1.tp_child", str(tiny_model_dir), url,
                 str(monitor), str(worker), redis_server.url]  # fmt: skip
        proc = subprocess.run(child, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600)  # fmt: skip
    result = child_result.parse(proc.stdout)
    assert result is not None, f"TP=2 child failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    yield result


def test_repeat_is_served_from_both_ranks_caches(seen: dict[str, Any]) -> None:
    first, second = seen["cached"][:2]
    assert first == 0
    assert second >= 192  # three full 64-token chunks on every rank


def test_cached_run_gives_the_same_tokens(seen: dict[str, Any]) -> None:
    assert seen["outputs"][0] == seen["outputs"][1]


def test_compress_reaches_every_rank_of_the_instance(seen: dict[str, Any]) -> None:
    event = seen["event"]
    assert event["status"] == "finished", event
    assert sorted(w["rank"] for w in event["workers"]) == [0, 1]
    assert all(w["chunks_done"] == 4 for w in event["workers"])
    assert seen["scheduled"]["num_tokens"] == 200


def test_compressed_shards_still_serve_the_prompt(seen: dict[str, Any]) -> None:
    assert seen["cached"][2] >= 192


def test_each_rank_stores_its_own_shard_under_its_own_layout(seen: dict[str, Any]) -> None:
    heads = seen["store_names"]  # one per chunk
    namespaces = {name.split(":")[1] for name in heads}
    assert len(heads) == 8 and len(namespaces) == 2  # 4 chunks per rank, one layout per rank


def test_each_rank_reads_its_own_shard_back_from_the_store(seen: dict[str, Any]) -> None:
    assert seen["cleared"]["removed"] == 8  # both ranks' local chunks are gone
    assert seen["cached"][3] >= 192
    assert seen["outputs"][3] == seen["outputs"][0]


def test_kvtc_is_refused_before_calibration_and_then_serves_from_cache(
    seen: dict[str, Any],
) -> None:
    kvtc = seen["kvtc"]
    assert kvtc["before_calibration"] == 409
    calibration = kvtc["calibration"]
    assert calibration["status"] == "finished", calibration
    assert len({w["calibration_id"] for w in calibration["workers"]}) == 2  # one per shard
    compressed = kvtc["compress"]
    assert compressed["status"] == "finished", compressed
    assert all(w["chunks_done"] == 4 and w["bytes_after"] < w["bytes_before"] / 3
               for w in compressed["workers"])  # fmt: skip
    first, again = kvtc["cached"]
    assert first == 0 and again >= 192  # served from the kvtc-compressed chunks of both ranks
