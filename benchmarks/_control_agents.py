"""Real control agents for the control-plane benchmarks, in a process of their own.

    python benchmarks/_control_agents.py MONITOR_PORT PORT,PORT,... [SECRET_FILE]

Starts one-worker instances `load-0..N-2` (CPU cache engines holding
`PROMPTS` prompts each) on the command ports given, plus one instance
`blocked` on the last port, whose compress jobs wait until the process
stops, so operations on it stay in progress. Prints `READY` once every agent is
started, its RSS on every line read from stdin (`rss`), and stops when stdin
closes.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmc_connector.config import load_config

if TYPE_CHECKING:
    from lmc_connector.control.agent.agent import ControlAgent

CHUNK = 256
PROMPTS = 4
PROMPT_TOKENS = 4 * CHUNK
#: Set when the process stops: the `blocked` instance's jobs may then run (and end).
RELEASE = threading.Event()


def prompt(n: int) -> list[int]:
    """The n-th benchmark prompt (shared with the load generator)."""
    return [(n * 7919 + i * 31) % 32000 for i in range(PROMPT_TOKENS)]


def start_agent(
    monitor_port: int, instance_id: str, port: int, secret: str | None, blocked: bool
) -> ControlAgent:
    import torch

    from lmc_connector.cache.engine import CacheEngine
    from lmc_connector.cache.layout import ChunkLayout
    from lmc_connector.control.agent.agent import ControlAgent

    values: dict[str, object] = {
        "chunk_size": CHUNK,
        "max_local_cpu_size": 0.05,
        "enable_controller": True,
        "controller_pull_url": f"127.0.0.1:{monitor_port}",
        "lmcache_worker_ports": [port],
        "lmcache_instance_id": instance_id,
        "controller_heartbeat_interval": 1.0,
    }
    if secret:
        values["control_secret_file"] = secret
    config = load_config(values, env={})
    engine = CacheEngine(config, ChunkLayout("bench", 1, 0, "float16", 2, 2, 16, CHUNK))
    engine.open()
    for n in range(PROMPTS):
        for key in engine.hashes(prompt(n)):
            engine.put(key, torch.randn(engine.layout.shape(CHUNK)).half())
    if blocked:
        real_run = engine.run

        def blocked_run(job: object) -> object:
            RELEASE.wait()
            return real_run(job)  # type: ignore[arg-type]

        engine.run = blocked_run  # type: ignore[method-assign,assignment]
    agent = ControlAgent(config, engine, 0, 1, "bench")
    agent.start()
    return agent


def main() -> None:
    monitor_port = int(sys.argv[1])
    *ports, last = [int(p) for p in sys.argv[2].split(",")]
    secret = sys.argv[3] if len(sys.argv) > 3 else None
    agents = [
        start_agent(monitor_port, f"load-{i}", port, secret, False) for i, port in enumerate(ports)
    ]
    agents.append(start_agent(monitor_port, "blocked", last, secret, True))
    print("READY", flush=True)
    for _ in sys.stdin:
        print(psutil.Process().memory_info().rss, flush=True)
    RELEASE.set()
    for agent in agents:
        agent.close()


if __name__ == "__main__":
    main()
