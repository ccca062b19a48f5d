"""Controller benchmark: prints figures, asserts nothing.

* admit/evict events ingested per second, through the real PULL socket and decoder
  of an `lmc-controller` subprocess (target >= 200,000/s);
* /lookup latency p50/p99 of a 32K-token prompt with 16 instances and 1M indexed
  chunks (target p50 < 2 ms);
* controller resident memory per indexed chunk (target < 200 bytes);
* /compress round trip (scheduling only) against two real agents on CPU cache engines;
* start-up: launch to the first /health answer, wall clock and the process's CPU time
  (target: well under a second).

    .venv/bin/python benchmarks/controller.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import zmq
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmc_connector import tokens as tok
from lmc_connector.control.wire import monitor as m
from lmc_connector.control.wire.codec import encode
from lmc_connector.launch import free_port

CPU = "LocalCPUBackend"
CHUNK = 256
PROMPT_TOKENS = 32 * 1024
INSTANCES = 16
BATCH_KEYS = 1024


def wait_for(check, timeout: float = 120.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except httpx.TransportError:
            value = None
        if value:
            return value
        time.sleep(0.01)
    raise TimeoutError("benchmark condition not reached")


def ingested(url: str) -> int:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "lmc_controller_chunk_events_total":
                return int(sample.value)
    return 0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_index(url: str, monitor_port: int, pid: int, total_chunks: int, lookups: int) -> None:
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 0)
    push.connect(f"tcp://127.0.0.1:{monitor_port}")
    prompt = [random.randrange(32000) for _ in range(PROMPT_TOKENS)]
    prompt_keys = tok.chunk_hashes(prompt, CHUNK)
    for i in range(INSTANCES):
        reg = m.Register(f"inst-{i}", 0, 1, "s0", "127.0.0.1", 1, "bench", CHUNK, [CPU], [])
        push.send(encode(reg))
    wait_for(lambda: len(httpx.get(f"{url}/instances").json()["instances"]) == INSTANCES)
    rss_before = psutil.Process(pid).memory_info().rss

    per_instance = total_chunks // INSTANCES
    batches: list[bytes] = []
    for i in range(INSTANCES):
        # every instance holds a different-length prefix of the prompt, then filler chunks
        keys = prompt_keys[: (i + 1) * len(prompt_keys) // INSTANCES]
        filler = per_instance - len(keys)
        keys = keys + [tok.ChunkKey(random.getrandbits(64)) for _ in range(filler)]
        for start in range(0, len(keys), BATCH_KEYS):
            op = m.ChunkOp(True, CPU, keys[start : start + BATCH_KEYS])
            batches.append(encode(m.ChunkEvents(f"inst-{i}", 0, "s0", [op])))
    base = ingested(url)
    started = time.perf_counter()
    for payload in batches:
        push.send(payload)
    wait_for(lambda: ingested(url) - base >= per_instance * INSTANCES)
    seconds = time.perf_counter() - started
    events = per_instance * INSTANCES
    print(f"admit events ingested: {events:,} in {seconds:.2f} s = {events / seconds:,.0f}/s")

    churn = min(200_000, events // 4)
    base = ingested(url)
    started = time.perf_counter()
    victims = [tok.ChunkKey(random.getrandbits(64)) for _ in range(churn // 2)]
    for kind in (True, False):
        for start in range(0, len(victims), BATCH_KEYS):
            op = m.ChunkOp(kind, CPU, victims[start : start + BATCH_KEYS])
            push.send(encode(m.ChunkEvents("inst-0", 0, "s0", [op])))
    wait_for(lambda: ingested(url) - base >= 2 * len(victims))
    seconds = time.perf_counter() - started
    print(
        f"admit+evict churn ingested: {2 * len(victims):,} in {seconds:.2f} s "
        f"= {2 * len(victims) / seconds:,.0f}/s"
    )

    time.sleep(0.5)
    rss_after = psutil.Process(pid).memory_info().rss
    print(
        f"controller RSS: {rss_before / 2**20:.0f} MiB -> {rss_after / 2**20:.0f} MiB, "
        f"{(rss_after - rss_before) / events:.0f} bytes per indexed chunk ({events:,} chunks)"
    )

    latencies = []
    body = json.dumps({"tokens": prompt}).encode()  # encoded once: time the controller, not json
    headers = {"Content-Type": "application/json"}
    with httpx.Client(base_url=url, timeout=10) as http:
        for _ in range(lookups + 10):
            t = time.perf_counter()
            answer = http.post("/lookup", content=body, headers=headers)
            latencies.append(time.perf_counter() - t)
            assert answer.status_code == 200
    hits = answer.json()["layout_info"]
    latencies = latencies[10:]
    print(
        f"/lookup 32K tokens, {INSTANCES} instances ({len(hits)} hits): "
        f"p50 {percentile(latencies, 0.5) * 1000:.2f} ms, "
        f"p99 {percentile(latencies, 0.99) * 1000:.2f} ms over {lookups} requests"
    )
    push.close(linger=0)
    context.term()


def bench_compress(url: str, monitor_port: int, rounds: int) -> None:
    import torch

    from lmc_connector.cache.engine import CacheEngine
    from lmc_connector.cache.layout import ChunkLayout
    from lmc_connector.config import load_config
    from lmc_connector.control.agent.agent import ControlAgent

    ports = [free_port(), free_port()]
    config = load_config(
        {
            "chunk_size": CHUNK,
            "enable_controller": True,
            "controller_pull_url": f"127.0.0.1:{monitor_port}",
            "lmcache_worker_ports": ports,
            "lmcache_instance_id": "bench-agents",
            "controller_heartbeat_interval": 0.5,
        },
        env={},
    )
    prompt = list(range(4 * CHUNK))
    agents = []
    for rank in range(2):
        engine = CacheEngine(config, ChunkLayout("bench", 2, rank, "float16", 2, 2, 64, CHUNK))
        engine.open()
        for key in engine.hashes(prompt):
            engine.put(key, torch.randn(engine.layout.shape(CHUNK)).half())
        agent = ControlAgent(config, engine, rank, 2, "bench")
        agent.start()
        agents.append(agent)
    wait_for(
        lambda: any(
            i["instance_id"] == "bench-agents" and len(i["workers"]) == 2
            for i in httpx.get(f"{url}/instances").json()["instances"]
        )
    )
    latencies = []
    body = {"instance_id": "bench-agents", "method": "cachegen", "location": CPU, "tokens": prompt}
    with httpx.Client(base_url=url, timeout=10) as http:
        for i in range(rounds + 3):
            path = "/compress" if i % 2 == 0 else "/decompress"
            t = time.perf_counter()
            answer = http.post(path, json=body)
            latencies.append(time.perf_counter() - t)
            assert answer.status_code == 200, answer.text
            event_id = answer.json()["event_id"]
            wait_for(lambda e=event_id: http.get(f"/events/{e}").json()["status"] != "running")
    latencies = latencies[3:]
    print(
        f"/compress|/decompress round trip (2 agents, scheduling only): "
        f"p50 {statistics.median(latencies) * 1000:.2f} ms, "
        f"p99 {percentile(latencies, 0.99) * 1000:.2f} ms over {rounds} requests"
    )
    for agent in agents:
        agent.close()


def bench_start(rounds: int) -> None:
    """Launch `lmc-controller` `rounds` times; wall and CPU seconds until /health answers."""
    walls, cpus = [], []
    for _ in range(rounds):
        port = free_port()
        args = ["--port", str(port), "--monitor-port", str(free_port()), "--log-level", "warning"]
        launched = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "lmc_connector.control.controller", *args])
        try:
            health = f"http://127.0.0.1:{port}/health"
            wait_for(lambda url=health: httpx.get(url).status_code == 200, 30)
            walls.append(time.perf_counter() - launched)
            times = psutil.Process(proc.pid).cpu_times()
            cpus.append(times.user + times.system)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    print(f"start-up to the first /health answer ({rounds} launches): wall median "
          f"{statistics.median(walls):.2f} s (min {min(walls):.2f}), CPU median "
          f"{statistics.median(cpus):.2f} s (min {min(cpus):.2f}); "
          "target: well under 1 s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="100K chunks, fewer requests")
    args = parser.parse_args()
    total = 100_000 if args.quick else 1_000_000
    port, monitor_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lmc_connector.control.controller",
            "--port",
            str(port),
            "--monitor-port",
            str(monitor_port),
            "--worker-timeout",
            "3600",
            "--log-level",
            "warning",
        ]
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/health").status_code == 200, timeout=30)
        bench_index(url, monitor_port, proc.pid, total, 50 if args.quick else 500)
        bench_compress(url, monitor_port, 10 if args.quick else 50)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    bench_start(3 if args.quick else 10)


if __name__ == "__main__":
    main()
