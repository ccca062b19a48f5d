"""Builders and deadline-polling helpers for control-plane tests (real processes, real sockets)."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

T = TypeVar("T")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CPU = "LocalCPUBackend"
DISK = "LocalDiskBackend"
#: Agents heartbeat this often in tests, so resyncs and expiries take well under a second.
HEARTBEAT_S = 0.1


def wait_until(check: Callable[[], T | None], timeout: float = 10.0, what: str = "condition") -> T:
    """Poll `check` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (httpx.TransportError, AssertionError, KeyError) as e:
            last = e
        else:
            if last:
                return last
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")


def sigint_as_at_a_terminal() -> None:
    """Run in a child before it starts: SIGINT back to its default, as a program started at a
    terminal has it. A shell that runs the tests as a background job leaves SIGINT ignored,
    and children inherit that, so a test's Ctrl-C would never arrive."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class Controller:
    """An `lmc-controller` subprocess."""

    port: int
    monitor_port: int
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    #: CA of the controller's certificate: it serves HTTPS (pass --ssl-certfile in `args`).
    cacert: Path | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.cacert else 'http'}://127.0.0.1:{self.port}"

    def http(self, **options: Any) -> httpx.Client:
        """A client of its HTTP API (trusting its CA, with its API key if it has one)."""
        key = self.env.get("LMC_CONTROLLER_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=self.cacert) if self.cacert else True
        )
        options.setdefault("timeout", 10)
        return httpx.Client(base_url=self.url, headers=headers, verify=verify, **options)

    def start(self, timeout: float = 15.0) -> float:
        """Start and wait for /health; returns seconds from launch to the first answer."""
        env = {**os.environ, **self.env}
        log = self.log.open("ab") if self.log else subprocess.DEVNULL
        launched = time.monotonic()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lmc_connector.control.controller",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--monitor-port",
                str(self.monitor_port),
                *self.args,
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=sigint_as_at_a_terminal,
        )
        with self.http(timeout=1) as client:

            def up() -> bool:
                assert self.process is not None and self.process.poll() is None, "exited"
                return client.get("/health").status_code < 500

            wait_until(up, timeout, "the controller to answer /health")
        return time.monotonic() - launched

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def engine_config(monitor_port: int, instance_id: str, ports: Sequence[int], **extra: Any) -> Any:
    from lmc_connector.config import load_config

    values: dict[str, Any] = {
        "chunk_size": 4,
        "max_local_cpu_size": 0.01,
        "enable_controller": True,
        "controller_pull_url": f"localhost:{monitor_port}",
        "lmcache_worker_ports": list(ports),
        "lmcache_instance_id": instance_id,
        "controller_heartbeat_interval": HEARTBEAT_S,
    }
    values.update(extra)
    return load_config(values, env={})


@dataclass
class Worker:
    engine: Any
    agent: Any

    def fill(self, tokens: Sequence[int], seed: int = 0, scope: Any = None) -> None:
        """Store every chunk of `tokens` in the engine (as vLLM's save path would), keyed
        under `scope` (a `tokens.KeyScope`: the request's salt, adapter, images)."""
        import torch

        from lmc_connector.tokens import Prompt

        engine = self.engine
        size = engine.layout.chunk_size
        generator = torch.Generator().manual_seed(seed)
        for i, key in enumerate(engine.hashes(Prompt(tokens, scope))):
            n = min(size, len(tokens) - i * size)
            kv = torch.randn(engine.layout.shape(n), generator=generator)
            assert engine.put(key, kv.to(engine.layout.torch_dtype))

    def encoded(self, tokens: Sequence[int], location: str = CPU) -> list[bool]:
        tier = self.engine.tier(location)
        loaded = [tier.load(k)[1] for k in self.engine.hashes(tokens)]
        return [chunk.encoded for chunk in loaded if chunk is not None]


def start_worker(config: Any, rank: int, world_size: int, model: str = "tiny") -> Worker:
    from lmc_connector.cache.engine import CacheEngine
    from lmc_connector.cache.layout import ChunkLayout
    from lmc_connector.control.agent.agent import ControlAgent

    layout = ChunkLayout(model, world_size, rank, "float32", 2, 2, 8, config.chunk_size)
    engine = CacheEngine(config, layout)
    engine.open()
    agent = ControlAgent(config, engine, rank, world_size, model)
    agent.start()
    return Worker(engine, agent)


def start_worker_process(
    monitor_port: int,
    instance_id: str,
    port: int,
    rank: int,
    world_size: int,
    tokens: list[int],
    block_jobs: bool = False,
) -> subprocess.Popen[bytes]:
    """A worker (engine + agent) in its own process, holding `tokens`; see worker_proc.py."""
    args = [
        sys.executable,
        str(HERE / "worker_proc.py"),
        str(monitor_port),
        instance_id,
        str(port),
        str(rank),
        str(world_size),
        ",".join(map(str, tokens)),
        "block" if block_jobs else "run",
    ]
    return subprocess.Popen(args, stdin=subprocess.PIPE, cwd=ROOT)


def registered(url: str, instance_id: str, workers: int, chunks: int | None = None) -> bool:
    """True once the instance has `workers` workers (each indexing `chunks` chunks, if given)."""
    data = httpx.get(f"{url}/instances", timeout=2).json()
    for inst in data["instances"]:
        if inst["instance_id"] == instance_id and len(inst["workers"]) == workers:
            if chunks is None:
                return True
            return all(
                sum(u["chunks"] for u in w["usage"].values()) == chunks for w in inst["workers"]
            )
    return False
