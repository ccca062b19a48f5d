"""Two vLLM instances, one after the other, share KV through a real Redis.

Instance A is vLLM's OpenAI server (`remote_serde: naive`): it serves two
prompts, uploads their chunks, and is stopped. Instance B is an in-process
`LLM` with empty local tiers (`remote_serde: cachegen`) and the KV probe of
`kv_probe.py`: it answers A's prompts from the store, uploads its own chunks
encoded, and keeps serving when the store is killed.
"""

from __future__ import annotations

import gc
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import torch

from lmc_connector.launch import Service
from tests.control.harness import wait_until
from tests.v1.test_llm import BLOCK, FULL_BLOCKS, PROMPT_LEN, generate, prompt_ids, take_records
from tests.vllm_server import vllm_server

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

CHUNK = 64
#: Chunks of one prompt: four full ones and a partial one.
PROMPT_CHUNKS = 5
REMOTE = "RemoteBackend"
CPU = "LocalCPUBackend"
SHARED = prompt_ids(21, PROMPT_LEN)
SHARED_TOO = prompt_ids(22, PROMPT_LEN)


def store_config(url: str, serde: str) -> dict[str, object]:
    return {"chunk_size": CHUNK, "max_local_cpu_size": 0.5, "remote_url": url,
            "remote_serde": serde}  # fmt: skip


def stored_chunks(url: str) -> int:
    """Chunks in the store: their heads (`lmc:<layout>:{<hash>}`; pieces add `:<i>`)."""
    client = redis.Redis.from_url(url)
    try:
        return sum(1 for name in client.scan_iter("lmc:*") if name.endswith(b"}"))
    finally:
        client.close()


@pytest.fixture(scope="module")
def first_instance(
    tiny_model_dir: Path, redis_server: Service, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """Instance A serves both prompts, uploads them (naive), and is stopped; what it said."""
    logs = tmp_path_factory.mktemp("instance-a")
    connector = {"kv_connector": "LMCConnectorV1", "kv_role": "kv_both",
                 "kv_connector_extra_config": store_config(redis_server.url, "naive")}  # fmt: skip
    args = ("--kv-transfer-config", json.dumps(connector), "--enable-prompt-tokens-details",
            "--no-enable-prefix-caching", "--dtype", "float32")  # fmt: skip
    answers = []
    with (
        vllm_server(tiny_model_dir, *args, log_path=logs / "vllm.log") as server,
        httpx.Client(base_url=server.url, timeout=120.0) as http,
    ):
        for ids in (SHARED, SHARED_TOO):
            body = {"model": str(tiny_model_dir), "prompt": ids, "max_tokens": 8,
                    "temperature": 0}  # fmt: skip
            answers.append(http.post("/v1/completions", json=body).json())
        wait_until(
            lambda: stored_chunks(redis_server.url) == 2 * PROMPT_CHUNKS,
            timeout=60,
            what="instance A's uploads",
        )
    return {"answers": answers}


@pytest.fixture(scope="module")
def second_instance(
    tiny_model_dir: Path, redis_server: Service, first_instance: dict[str, Any]
) -> Iterator[Any]:
    """Instance B: a fresh process state, empty local tiers, the same store."""
    from vllm import LLM

    llm = LLM(
        model=str(tiny_model_dir),
        enforce_eager=True,
        block_size=BLOCK,
        max_model_len=1024,
        dtype="float32",
        enable_prefix_caching=False,
        worker_extension_cls="tests.v1.kv_probe.KVProbe",
        kv_transfer_config={
            "kv_connector": "LMCConnectorV1",
            "kv_connector_module_path": "lmc_connector.v1",
            "kv_role": "kv_both",
            "kv_connector_extra_config": store_config(redis_server.url, "cachegen"),
        },
    )
    llm.collective_rpc("lmc_install_recorder")
    yield llm
    del llm
    gc.collect()


def test_first_instance_computed_both_prompts(first_instance: dict[str, Any]) -> None:
    for answer in first_instance["answers"]:
        assert answer["usage"]["prompt_tokens"] == PROMPT_LEN
        assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_second_instance_answers_from_the_store_with_bit_identical_kv(
    second_instance: Any, first_instance: dict[str, Any]
) -> None:
    take_records(second_instance)
    served = generate(second_instance, SHARED)
    # Everything but the last prompt token came from the store (the partial chunk too).
    assert served.num_cached_tokens == PROMPT_LEN - 1
    assert served.outputs[0].text == first_instance["answers"][0]["choices"][0]["text"]
    ((kind, _, loaded),) = take_records(second_instance)
    assert kind == "load"
    # Recompute from scratch (nothing cached anywhere) and compare with what was loaded.
    second_instance.collective_rpc("lmc_clear")
    generate(second_instance, SHARED)
    ((kind, _, recomputed),) = take_records(second_instance)
    assert kind == "save"
    assert torch.equal(loaded[:, :, :FULL_BLOCKS], recomputed[:, :, :FULL_BLOCKS])


def test_cachegen_values_serve_a_fresh_cache_within_tolerance(
    second_instance: Any, redis_server: Service
) -> None:
    ids = prompt_ids(23, PROMPT_LEN)
    second_instance.collective_rpc("lmc_flush")  # earlier uploads are done
    before = stored_chunks(redis_server.url)
    generate(second_instance, ids)
    second_instance.collective_rpc("lmc_flush")
    assert stored_chunks(redis_server.url) == before + PROMPT_CHUNKS
    ((_, _, computed),) = take_records(second_instance)
    second_instance.collective_rpc("lmc_clear", args=(CPU,))  # empty local tiers again
    served = generate(second_instance, ids)
    assert served.num_cached_tokens == PROMPT_LEN - 1
    ((kind, _, loaded),) = take_records(second_instance)
    assert kind == "load"
    error = (loaded - computed[:, :, : loaded.shape[2]]).norm() / computed.norm()
    assert 0 < float(error) < 0.3, "cachegen is lossy but close"


def test_store_killed_mid_run_requests_still_succeed_as_misses(
    second_instance: Any, redis_server: Service, first_instance: dict[str, Any]
) -> None:
    os.killpg(redis_server.process.pid, signal.SIGKILL)
    redis_server.process.wait(timeout=10)
    second_instance.collective_rpc("lmc_clear", args=(CPU,))
    again = generate(second_instance, SHARED_TOO)
    assert again.num_cached_tokens == 0  # the store is gone: recomputed
    assert again.outputs[0].text == first_instance["answers"][1]["choices"][0]["text"]
    fresh = generate(second_instance, prompt_ids(24, 200))
    assert fresh.num_cached_tokens == 0 and len(fresh.outputs[0].token_ids) == 8
    # The local tiers still work while the store is away.
    assert generate(second_instance, SHARED_TOO).num_cached_tokens == PROMPT_LEN - 1
