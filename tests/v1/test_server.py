"""The OpenAI server with the connector, named through the plugin and through the module path.

The project config comes from `LMCACHE_CONFIG_FILE`, written as an LMCache
user's file with a dozen LMCache-only keys (and LMCache's leftover variables in
the environment): the server starts with one warning listing them. A repeated
prompt must report cached prompt tokens (`--enable-prompt-tokens-details`).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.text import sample_text
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


@pytest.mark.parametrize("form", sorted(FORMS))
def test_repeated_prompt_reports_cached_tokens(
    form: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = tmp_path / "lmcache.yaml"
    config.write_text("chunk_size: 64\nlocal_cpu: true\nmax_local_cpu_size: 0.5\n" + LMCACHE_ONLY)
    args = (
        "--kv-transfer-config",
        json.dumps(FORMS[form]),
        "--enable-prompt-tokens-details",
        "--no-enable-prefix-caching",
        "--dtype",
        "float32",
    )
    env = {
        "LMCACHE_CONFIG_FILE": str(config),
        "LMCACHE_USE_EXPERIMENTAL": "True",
        "LMCACHE_TRACK_USAGE": "false",
    }
    prompt = sample_text(150)
    body = {"model": str(tiny_model_dir), "prompt": prompt, "max_tokens": 4, "temperature": 0}
    log = tmp_path / "server.log"
    with (
        vllm_server(tiny_model_dir, *args, env=env, log_path=log) as server,
        httpx.Client(base_url=server.url, timeout=60.0) as http,
    ):
        first = http.post("/v1/completions", json=body).json()
        second = http.post("/v1/completions", json=body).json()
    prompt_tokens = first["usage"]["prompt_tokens"]
    assert prompt_tokens > 128
    details = second["usage"]["prompt_tokens_details"]
    assert details is not None and details["cached_tokens"] >= 128, second["usage"]
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    warnings = [
        line for line in log.read_text().splitlines() if "not implemented here, ignored" in line
    ]
    assert len(warnings) == 1, warnings
    for name in ("save_decode_cache", "lmcache_worker_heartbeat_time", "LMCACHE_USE_EXPERIMENTAL"):
        assert name in warnings[0]
