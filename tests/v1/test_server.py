"""The OpenAI server with the connector, named through the plugin and through the module path.

The project config comes from `LMCACHE_CONFIG_FILE`, written as an LMCache
user's file with a dozen LMCache-only keys (and LMCache's leftover variables in
the environment): the server starts with one warning listing them. A repeated
prompt must report cached prompt tokens (`--enable-prompt-tokens-details`).
vLLM's own prefix cache is off, so every cached token comes from this connector.

One server (the plugin form, with LoRA on and an adapter made here) serves
every test of the module but the module-path form, which starts its own.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.text import sample_text
from tests.v1.lora_adapter import write_lora_adapter
from tests.vllm_server import vllm_server

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

#: Keys LMCache knows and lmc_connector does not implement: ignored, with one warning.
LMCACHE_ONLY = """\
save_decode_cache: false
use_layerwise: false
enable_blending: false
cache_policy: LRU
local_device: cpu
extra_config: {}
pre_caching_hash_algorithm: builtin
save_unfull_chunk: true
blend_min_tokens: 256
numa_mode: null
py_enable_gc: true
lmcache_worker_heartbeat_time: 10
"""

FORMS = {
    "plugin": {"kv_connector": "LMCConnectorV1", "kv_role": "kv_both"},
    "module_path": {
        "kv_connector": "LMCConnectorV1",
        "kv_connector_module_path": "lmc_connector.v1",
        "kv_role": "kv_both",
    },
}
ADAPTER = "sql-adapter"


def server_args(form: str) -> tuple[str, ...]:
    return (
        "--kv-transfer-config",
        json.dumps(FORMS[form]),
        "--enable-prompt-tokens-details",
        "--no-enable-prefix-caching",
        "--dtype",
        "float32",
    )


def config_env(tmp: Path) -> dict[str, str]:
    config = tmp / "lmcache.yaml"
    config.write_text("chunk_size: 64\nlocal_cpu: true\nmax_local_cpu_size: 0.5\n" + LMCACHE_ONLY)
    return {
        "LMCACHE_CONFIG_FILE": str(config),
        "LMCACHE_USE_EXPERIMENTAL": "True",
        "LMCACHE_TRACK_USAGE": "false",
    }


def assert_one_warning_lists_the_lmcache_only_settings(log: Path) -> None:
    warnings = [
        line for line in log.read_text().splitlines() if "not implemented here, ignored" in line
    ]
    assert len(warnings) == 1, warnings
    for name in ("save_decode_cache", "lmcache_worker_heartbeat_time", "LMCACHE_USE_EXPERIMENTAL"):
        assert name in warnings[0]


@pytest.fixture(scope="module")
def server_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server") / "server.log"


@pytest.fixture(scope="module")
def http(tiny_model_dir: Path, server_log: Path) -> Iterator[httpx.Client]:
    tmp = server_log.parent
    adapter = write_lora_adapter(tiny_model_dir, tmp / ADAPTER)
    lora = ("--enable-lora", "--max-lora-rank", "8", "--lora-modules", f"{ADAPTER}={adapter}")
    with (
        vllm_server(
            tiny_model_dir, *server_args("plugin"), *lora, env=config_env(tmp), log_path=server_log
        ) as server,
        httpx.Client(base_url=server.url, timeout=120.0) as client,
    ):
        yield client


def complete(
    http: httpx.Client, model: str | Path, prompt: str, **extra: Any
) -> tuple[int, str, int]:
    """(prompt tokens, text, cached prompt tokens) of a greedy completion."""
    body = {"model": str(model), "prompt": prompt, "max_tokens": 4, "temperature": 0, **extra}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    details = answer["usage"]["prompt_tokens_details"] or {}
    cached = details.get("cached_tokens") or 0
    return answer["usage"]["prompt_tokens"], answer["choices"][0]["text"], cached


def test_repeated_prompt_reports_cached_tokens(
    http: httpx.Client, tiny_model_dir: Path, server_log: Path
) -> None:
    prompt = sample_text(150)
    tokens, first, _ = complete(http, tiny_model_dir, prompt)
    assert tokens > 128
    _, second, cached = complete(http, tiny_model_dir, prompt)
    assert cached >= 128
    assert second == first
    assert_one_warning_lists_the_lmcache_only_settings(server_log)


def test_prompts_with_different_cache_salts_never_share_kv(
    http: httpx.Client, tiny_model_dir: Path
) -> None:
    prompt = sample_text(160)[7:]
    _, text_a, cached = complete(http, tiny_model_dir, prompt, cache_salt="tenant-a")
    assert cached == 0
    assert complete(http, tiny_model_dir, prompt, cache_salt="tenant-b")[2] == 0
    assert complete(http, tiny_model_dir, prompt)[2] == 0  # no salt: another tenant still
    _, again, cached = complete(http, tiny_model_dir, prompt, cache_salt="tenant-a")
    assert cached >= 128  # tenant a's own KV is served back to tenant a
    assert again == text_a


def test_a_lora_adapter_gets_kv_of_its_own(http: httpx.Client, tiny_model_dir: Path) -> None:
    prompt = sample_text(170)[11:]
    _, base_text, _ = complete(http, tiny_model_dir, prompt)
    _, lora_text, cached = complete(http, ADAPTER, prompt)
    assert cached == 0  # the base model's KV was cached, but is not this adapter's KV
    _, lora_again, cached = complete(http, ADAPTER, prompt)
    assert cached >= 128
    assert lora_again == lora_text
    _, base_again, cached = complete(http, tiny_model_dir, prompt)
    assert cached >= 128 and base_again == base_text


def test_the_module_path_form_loads_the_connector_without_the_plugin(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    prompt = sample_text(150)
    with (
        vllm_server(
            tiny_model_dir,
            *server_args("module_path"),
            env=config_env(tmp_path),
            log_path=tmp_path / "server.log",
        ) as server,
        httpx.Client(base_url=server.url, timeout=120.0) as client,
    ):
        _, first, _ = complete(client, tiny_model_dir, prompt)
        _, second, cached = complete(client, tiny_model_dir, prompt)
    assert cached >= 128 and second == first
    assert_one_warning_lists_the_lmcache_only_settings(tmp_path / "server.log")
