"""How the benchmarks run vLLM in a child process: one environment, one way to get its result.

Every vLLM child of `ttft.py`, `capacity.py` and `remote_tier.py --vllm` runs with the same
settings, so their figures compare: offline (no hub), one core reserved for the serving
process (vLLM on CPU reserves one more when any KV connector is configured: on a 2-core
machine that would silently give the worker both cores, on one side only), and tcmalloc
preloaded where installed, as vLLM's CPU guide asks (with glibc's malloc every buffer a load
frees goes back to the kernel, and the next load pays its page faults again). The child
reports through `examples.child_result`.
"""

from __future__ import annotations

import ctypes.util
import os
import subprocess
from pathlib import Path
from typing import Any

from examples import child_result

ROOT = Path(__file__).resolve().parents[1]


def tcmalloc() -> str | None:
    """The tcmalloc library vLLM's children preload (`libtcmalloc-minimal4`), if installed."""
    return ctypes.util.find_library("tcmalloc_minimal")


def allocator() -> str:
    """What the children allocate with, for a benchmark's header."""
    return tcmalloc() or "glibc malloc (no tcmalloc installed: loads fault more)"


def child_env(kv_cache_gib: int) -> dict[str, str]:
    """This process's environment with the settings above; the repository and `benchmarks/`
    on the path."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    paths = (str(ROOT), str(ROOT / "benchmarks"), env.get("PYTHONPATH"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    library = tcmalloc()
    if library is not None and "tcmalloc" not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = os.pathsep.join(p for p in (library, env.get("LD_PRELOAD")) if p)
    return env


def run_vllm_child(
    cmd: list[str], what: str, kv_cache_gib: int, timeout: float, show_log: bool = False
) -> Any:
    """Run `cmd` with `child_env` and return its result; `show_log`: its stderr (vLLM's log,
    progress) goes to ours instead of into the error raised when it fails."""
    proc = subprocess.run(
        cmd,
        stdout=subprocess.PIPE,
        stderr=None if show_log else subprocess.PIPE,
        text=True,
        env=child_env(kv_cache_gib),
        timeout=timeout,
    )
    result = child_result.parse(proc.stdout)
    if result is not None:
        return result
    log = "" if show_log else f":\n{proc.stderr[-4000:]}"
    raise RuntimeError(f"{what} failed with exit code {proc.returncode}{log}")
