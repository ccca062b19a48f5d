"""Start vLLM's OpenAI server for a test and always take it down again.

    with vllm_server(model_dir, "--kv-transfer-config", json.dumps(cfg), env=extra) as server:
        httpx.post(f"{server.url}/v1/completions", json=...)

A thin layer over `examples.services`, which the walk-through uses too: the
server runs in its own process group, start-up waits for `/health` against a
deadline, and exit stops the whole group (engine core and workers included).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from lmc_connector import launch as services

#: Flags that keep the tiny model cheap on a 2-core CPU machine.
CPU_DEFAULTS: tuple[str, ...] = ("--enforce-eager", "--block-size", "32", "--max-model-len", "1024")


@contextmanager
def vllm_server(
    model: str | os.PathLike[str],
    *args: str,
    env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
    startup_timeout: float = 240.0,
    cpu_defaults: Sequence[str] = CPU_DEFAULTS,
) -> Iterator[services.Service]:
    """Run the server with `args` after `--model MODEL --port PORT` and the CPU defaults."""
    port = services.free_port()
    log_path = log_path or Path(os.environ.get("TMPDIR", "/tmp")) / f"vllm-server-{port}.log"
    command = services.openai_server_command(str(model), port, *cpu_defaults, *args)
    full_env = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
    url = f"http://127.0.0.1:{port}"
    with services.running(
        "vLLM", command, url, log_path, env=full_env, timeout=startup_timeout
    ) as server:
        yield server
