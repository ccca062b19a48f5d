"""What a vLLM server with this connector shows its operator: `vllm:lmc_*` on `/metrics`,
cached tokens by source, a `/reset_prefix_cache` that really resets, KV events on vLLM's
ZMQ endpoint, and the connector's log lines in vLLM's log output.

One controller and one vLLM server (KV events on, dev routes on) serve the module; each
test uses its own prompt.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgspec
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families
from vllm.distributed.kv_events import BlockStored, KVEventBatch

from lmc_connector.launch import free_port
from tests.control.harness import Controller, wait_until
from tests.text import sample_text
from tests.vllm_server import vllm_server

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

CHUNK = 64
INSTANCE = "observed-instance"
CPU = "LocalCPUBackend"


def prompt_for(test: str) -> str:
    """A prompt no other test sends (the cache is shared by the module's tests)."""
    return f"test {test}: " + sample_text(150)


@dataclass
class Served:
    http: httpx.Client
    controller: Controller
    model: str
    events_url: str
    log: Path

    def complete(self, prompt: str) -> dict[str, object]:
        body = {"model": self.model, "prompt": prompt, "max_tokens": 2, "temperature": 0}
        answer = self.http.post("/v1/completions", json=body)
        assert answer.status_code == 200, answer.text
        usage: dict[str, object] = answer.json()["usage"]
        return usage

    def cached(self, prompt: str) -> int:
        details = self.complete(prompt)["prompt_tokens_details"]
        assert isinstance(details, dict)
        return int(details["cached_tokens"])

    def tokens(self, prompt: str) -> list[int]:
        answer = self.http.post("/tokenize", json={"model": self.model, "prompt": prompt})
        return list(answer.json()["tokens"])

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` with these labels (0 when there are none)."""
        text = self.http.get("/metrics").text
        return sum(
            float(s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("observed")
    controller = Controller(free_port(), free_port(), log=tmp / "controller.log")
    controller.start()
    config = tmp / "lmcache.yaml"
    config.write_text(
        f"chunk_size: {CHUNK}\nlocal_cpu: true\nmax_local_cpu_size: 0.5\n"
        f"enable_controller: true\nlmcache_instance_id: {INSTANCE}\n"
        f"controller_pull_url: localhost:{controller.monitor_port}\n"
        f"lmcache_worker_ports: {free_port()}\ncontroller_heartbeat_interval: 0.5\n"
    )
    events_port = free_port()
    kv_events = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://*:{events_port}",
        "topic": "",
    }
    args = (
        "--kv-transfer-config",
        json.dumps({"kv_connector": "LMCConnectorV1", "kv_role": "kv_both"}),
        "--kv-events-config",
        json.dumps(kv_events),
        "--enable-prompt-tokens-details",
        "--no-enable-prefix-caching",
        "--dtype",
        "float32",
    )
    env = {
        "LMCACHE_CONFIG_FILE": str(config),
        "VLLM_SERVER_DEV_MODE": "1",  # /reset_prefix_cache is a dev route
        "VLLM_LOG_STATS_INTERVAL": "1",
    }
    log = tmp / "vllm.log"
    try:
        with (
            vllm_server(tiny_model_dir, *args, env=env, log_path=log) as server,
            httpx.Client(base_url=server.url, timeout=120.0) as http,
        ):
            yield Served(
                http, controller, str(tiny_model_dir), f"tcp://127.0.0.1:{events_port}", log
            )
    finally:
        controller.stop()


def test_a_hit_shows_on_vllms_metrics_by_tier_and_as_host_tokens(served: Served) -> None:
    prompt = prompt_for("11")
    hit_before = served.metric("vllm:prompt_tokens_cached_by_source_total", source="host")
    served.complete(prompt)
    assert served.cached(prompt) >= 2 * CHUNK

    def recorded() -> bool:
        return served.metric("vllm:lmc_load_tokens_total", tier=CPU) >= 2 * CHUNK

    wait_until(recorded, timeout=30, what="the load counted on /metrics")
    assert served.metric("vllm:lmc_save_tokens_total", tier=CPU) >= 2 * CHUNK
    assert served.metric("vllm:lmc_load_bytes_total", tier=CPU) > 0
    assert served.metric("vllm:lmc_lookup_hits_total") >= 1
    assert served.metric("vllm:lmc_load_seconds_count") >= 1
    assert served.metric("vllm:lmc_tier_used_bytes", tier=CPU, rank="0") > 0
    # vLLM files the hit under the tier it came from, not as external_unspecified.
    host = served.metric("vllm:prompt_tokens_cached_by_source_total", source="host")
    assert host - hit_before >= 2 * CHUNK
    assert (
        served.metric("vllm:prompt_tokens_cached_by_source_total", source="external_unspecified")
        == 0
    )


def test_kv_events_announce_the_chunks_this_cache_saved(served: Served) -> None:
    prompt = prompt_for("12")
    tokens = served.tokens(prompt)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(served.events_url)
    try:
        time.sleep(0.5)  # a SUB socket misses what is published before it joined
        served.complete(prompt)
        stored: list[BlockStored] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(e.medium == "CPU" for e in stored):
            if sub.poll(500):
                _topic, _seq, payload = sub.recv_multipart()
                batch = msgspec.msgpack.decode(payload, type=KVEventBatch)
                stored += [e for e in batch.events if isinstance(e, BlockStored)]
    finally:
        sub.close()
        context.term()
    ours = [e for e in stored if e.medium == "CPU"]
    assert ours, f"no BlockStored with medium CPU among {stored[:5]}"
    first = next(e for e in ours if e.parent_block_hash is None)
    assert first.token_ids == tokens[:CHUNK]
    assert first.block_size == CHUNK
    second = next(e for e in ours if e.parent_block_hash == first.block_hashes[0])
    assert second.token_ids == tokens[CHUNK : 2 * CHUNK]


def test_reset_prefix_cache_empties_this_cache_too(served: Served) -> None:
    prompt = prompt_for("13")
    served.complete(prompt)
    assert served.cached(prompt) >= 2 * CHUNK
    answer = served.http.post("/reset_prefix_cache", params={"reset_external": "true"})
    assert answer.status_code == 200, answer.text
    assert served.cached(prompt) == 0


def test_connector_log_lines_appear_in_vllms_output_in_vllms_format(served: Served) -> None:
    prompt = prompt_for("14")
    served.complete(prompt)
    tokens = served.tokens(prompt)
    body = {"instance_id": INSTANCE, "method": "fp8", "location": CPU, "tokens": tokens}
    event = httpx.post(f"{served.controller.url}/compress", json=body, timeout=30).json()
    wait_until(
        lambda: (
            httpx.get(f"{served.controller.url}/events/{event['event_id']}").json()["status"]
            == "finished"
        ),
        what="the compress job",
    )
    served.complete(prompt)  # traffic, so that the periodic metrics line follows
    # vLLM's format: "(Process pid=N) LEVEL MM-DD HH:MM:SS [file.py:line] message".
    vllm_line = r"\(\w+ pid=\d+\) INFO \d\d-\d\d \d\d:\d\d:\d\d \[[\w./]+:\d+\] "
    expected = {
        "start-up summary": vllm_line + r"lmc_connector scheduler side: chunk_size 64",
        "worker set-up": vllm_line + r"lmc_connector worker 0/1: .* tiers: LocalCPUBackend",
        "registration": vllm_line + rf"control agent {INSTANCE}/0 registered",
        "job completion": vllm_line + r"compress with fp8, event \w+: \d+ chunks done",
        "vLLM's metrics line": r"KV Transfer metrics: .*lookups=\d+",
    }

    def logged() -> list[str]:
        text = served.log.read_text(errors="replace")
        return [name for name, pattern in expected.items() if not re.search(pattern, text)]

    deadline = time.monotonic() + 30
    missing = logged()
    while missing and time.monotonic() < deadline:
        time.sleep(0.5)
        missing = logged()
    assert not missing, f"not in {served.log}: {missing}"
