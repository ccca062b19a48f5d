"""Start vLLM's OpenAI server for a test and always take it down again.

    with vllm_server(model_dir, "--kv-transfer-config", json.dumps(cfg), env=extra) as server:
        httpx.post(f"{server.url}/v1/completions", json=...)

A thin layer over `lmc_connector.launch`, which the walk-through uses too: the
server runs in its own process group, start-up waits for `/health` against a
deadline, and exit stops the whole group (engine core and workers included).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

from lmc_connector import launch as services

#: Start-ups tried when the chosen port is taken before vLLM binds it.
PORT_ATTEMPTS = 3
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
    """Run the server with `args` after `--model MODEL --port PORT` and the CPU defaults.

    A free port can be taken by another process before vLLM binds it: start-up
    is retried on another port then (at most `PORT_ATTEMPTS` times).
    """
    full_env = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
    for attempt in range(1, PORT_ATTEMPTS + 1):
        port = services.free_port()
        log = log_path or Path(os.environ.get("TMPDIR", "/tmp")) / f"vllm-server-{port}.log"
        command = services.openai_server_command(str(model), port, *cpu_defaults, *args)
        stack = ExitStack()
        try:
            server = stack.enter_context(
                services.running(
                    "vLLM", command, f"http://127.0.0.1:{port}", log, env=full_env,
                    timeout=startup_timeout,
                )
            )  # fmt: skip
        except services.ServiceError as e:
            stack.close()
            if "Address already in use" in str(e) and attempt < PORT_ATTEMPTS:
                continue
            raise
        with stack:
            yield server
        return
