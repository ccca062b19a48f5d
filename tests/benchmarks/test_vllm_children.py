"""Every benchmark's vLLM child runs in one environment and reports one way (real subprocesses)."""

import sys

import pytest

from benchmarks import _vllm_children as children

CHILD = (
    "import os, sys\n"
    "from examples import child_result\n"
    "child_result.emit({'preload': os.environ.get('LD_PRELOAD', ''),"
    " 'reserved': os.environ['VLLM_CPU_NUM_OF_RESERVED_CPU'],"
    " 'kv_gib': os.environ['VLLM_CPU_KVCACHE_SPACE']})\n"
)


def test_a_child_reports_its_result_and_runs_with_the_shared_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    result = children.run_vllm_child([sys.executable, "-c", CHILD], "probe", 3, timeout=60)
    assert result["reserved"] == "1" and result["kv_gib"] == "3"
    library = children.tcmalloc()
    assert (library in result["preload"]) if library else result["preload"] == ""


def test_an_explicit_setting_of_the_user_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "9")
    assert children.child_env(kv_cache_gib=3)["VLLM_CPU_KVCACHE_SPACE"] == "9"


def test_a_child_without_a_result_fails_with_its_log() -> None:
    failing = "import sys; print('vllm: out of memory', file=sys.stderr); sys.exit(3)"
    with pytest.raises(RuntimeError, match=r"probe failed with exit code 3:\n.*out of memory"):
        children.run_vllm_child([sys.executable, "-c", failing], "probe", 3, timeout=60)
