"""End to end with `LLM(...)`: the connector saves prompt KV and a repeat loads it.

One in-process `LLM` serves the module (vLLM's own prefix caching off, the
disk tier only, chunks of 64 tokens over blocks of 32); a worker extension
(`kv_probe.py`) records the paged KV of each request the connector touched.
A last test starts a fresh process on the same disk directory.
"""

from __future__ import annotations

import gc
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from examples import child_result

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

CHUNK = 64
BLOCK = 32
PROMPT_LEN = 300  # four full chunks and a partial one of 44 tokens
#: Tokens in whole blocks. The CPU backend's K pages are not token rows, so the last, partial
#: block mixes loaded tokens with the last prompt token's K that the warm run recomputes.
FULL_BLOCKS = PROMPT_LEN // BLOCK * BLOCK
ROOT = Path(__file__).resolve().parents[2]


def prompt_ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 1024) for _ in range(n)]


def llm_kwargs(model: Path, disk: Path) -> dict[str, Any]:
    return dict(
        model=str(model),
        enforce_eager=True,
        block_size=BLOCK,
        max_model_len=1024,
        dtype="float32",
        enable_prefix_caching=False,
        kv_transfer_config={
            "kv_connector": "LMCConnectorV1",
            "kv_connector_module_path": "lmc_connector.v1",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {
                "chunk_size": CHUNK,
                "local_cpu": False,
                "local_disk": str(disk),
            },
        },
    )


@pytest.fixture(scope="module")
def disk_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lmc-disk")


@pytest.fixture(scope="module")
def llm(tiny_model_dir: Path, disk_dir: Path) -> Iterator[Any]:
    from vllm import LLM

    engine = LLM(
        worker_extension_cls="tests.v1.kv_probe.KVProbe", **llm_kwargs(tiny_model_dir, disk_dir)
    )
    engine.collective_rpc("lmc_install_recorder")
    yield engine
    del engine
    gc.collect()


def generate(llm: Any, ids: list[int], max_tokens: int = 8) -> Any:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]


def record_kv(shape: list[int], data: bytes) -> torch.Tensor:
    """The KV of a `kv_probe` record (float32 bytes)."""
    return torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(shape)


def take_records(llm: Any) -> list[tuple[str, str, torch.Tensor]]:
    (records,) = llm.collective_rpc("lmc_take_records")
    return [(kind, req, record_kv(shape, data)) for kind, req, shape, data in records]


def test_repeat_loads_bit_identical_kv_and_same_output(llm: Any) -> None:
    ids = prompt_ids(1, PROMPT_LEN)
    llm.collective_rpc("lmc_clear")
    take_records(llm)

    cold = generate(llm, ids)
    assert cold.num_cached_tokens == 0
    (saved,) = take_records(llm)
    assert saved[0] == "save" and saved[2].shape == (2, 2, PROMPT_LEN, 64)

    warm = generate(llm, ids)
    # Everything but the last prompt token comes from the cache (the partial chunk too).
    assert warm.num_cached_tokens == PROMPT_LEN - 1
    (loaded,) = take_records(llm)
    assert loaded[0] == "load" and loaded[2].shape[2] == PROMPT_LEN - 1
    assert torch.equal(loaded[2][:, :, :FULL_BLOCKS], saved[2][:, :, :FULL_BLOCKS])
    assert warm.outputs[0].token_ids == cold.outputs[0].token_ids


def test_recomputed_kv_equals_the_kv_that_was_loaded(llm: Any) -> None:
    ids = prompt_ids(2, PROMPT_LEN)
    generate(llm, ids)
    generate(llm, ids)
    (_, _, first), (_, _, loaded) = take_records(llm)
    llm.collective_rpc("lmc_clear")
    generate(llm, ids)
    ((kind, _, recomputed),) = take_records(llm)
    assert kind == "save"
    assert torch.equal(recomputed[:, :, :FULL_BLOCKS], loaded[:, :, :FULL_BLOCKS])
    assert torch.equal(recomputed[:, :, :FULL_BLOCKS], first[:, :, :FULL_BLOCKS])


def test_shared_prefix_is_a_partial_hit(llm: Any) -> None:
    base = prompt_ids(3, PROMPT_LEN)
    generate(llm, base)
    other = base[:150] + prompt_ids(4, 100)
    out = generate(llm, other)
    # Chunks 0 and 1 (128 tokens) match; chunk 2 differs from token 150 on.
    assert out.num_cached_tokens == 2 * CHUNK
    records = take_records(llm)
    kinds = [(kind, kv.shape[2]) for kind, _, kv in records]
    # The second request loads 128 tokens and saves its own chunks 2, 3 (full) and the partial.
    assert kinds[-2:] == [("load", 128), ("save", 250)]


def test_no_pins_left_after_requests(llm: Any) -> None:
    generate(llm, prompt_ids(5, 200))
    generate(llm, prompt_ids(5, 200))
    (state,) = llm.collective_rpc("lmc_state")
    assert state["pins"] == {}
    assert state["layout"] == [2, 2, 64]


def run_fresh_process(
    model: Path,
    disk: Path,
    ids: list[int],
    runs: int = 1,
    record: Path | None = None,
    **extra: Any,
) -> list[tuple[int, list[int]]]:
    """(cached tokens, output tokens) of `runs` generations of `ids` in a new `LLM` process
    whose disk tier is `disk`; `extra` overrides the engine's arguments. With `record`, the
    paged KV of each save and load (`kv_probe.py`) is written there (`read_records`)."""
    script = (
        "import json, sys\n"
        "from vllm import LLM, SamplingParams\n"
        "from examples import child_result\n"
        "from tests.v1.test_llm import llm_kwargs\n"
        "from pathlib import Path\n"
        "if __name__ == '__main__':\n"
        "    args = json.loads(sys.argv[1])\n"
        "    kwargs = {**llm_kwargs(Path(args['model']), Path(args['disk'])), **args['extra']}\n"
        "    if args['record']:\n"
        "        kwargs['worker_extension_cls'] = 'tests.v1.kv_probe.KVProbe'\n"
        "    llm = LLM(**kwargs)\n"
        "    if args['record']:\n"
        "        llm.collective_rpc('lmc_install_recorder')\n"
        "    params = SamplingParams(max_tokens=8, temperature=0.0)\n"
        "    prompt = [{'prompt_token_ids': args['ids']}]\n"
        "    runs = range(args['runs'])\n"
        "    outs = [llm.generate(prompt, params, use_tqdm=False)[0] for _ in runs]\n"
        "    result = [[o.num_cached_tokens, list(o.outputs[0].token_ids)] for o in outs]\n"
        "    if args['record']:\n"
        "        (records,) = llm.collective_rpc('lmc_take_records')\n"
        "        for i, (kind, _, shape, data) in enumerate(records):\n"
        "            name = f'{i}-{kind}-' + 'x'.join(map(str, shape))\n"
        "            Path(args['record'], name).write_bytes(data)\n"
        "    child_result.emit(result)\n"
    )
    arg = json.dumps(
        {"model": str(model), "disk": str(disk), "ids": ids, "extra": extra, "runs": runs,
         "record": str(record) if record is not None else None}
    )  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", script, arg],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    result = child_result.parse(proc.stdout)
    assert proc.returncode == 0 and result is not None, proc.stderr[-3000:]
    return [(cached, tokens) for cached, tokens in result]


def test_fresh_process_reuses_the_disk_tier(llm: Any, tiny_model_dir: Path, disk_dir: Path) -> None:
    ids = prompt_ids(6, PROMPT_LEN)
    first = generate(llm, ids)
    ((cached, tokens),) = run_fresh_process(tiny_model_dir, disk_dir, ids)
    assert cached == PROMPT_LEN - 1
    assert tokens == list(first.outputs[0].token_ids)


def _cpu_runs_fp8_kv() -> bool:
    """vLLM's CPU backend keeps an fp8 KV cache only with AVX-512 or AMX."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512f" in flags or " amx_bf16" in flags


def read_records(record: Path) -> list[tuple[str, torch.Tensor]]:
    """(kind, KV as float32) of each record `run_fresh_process` wrote, in order."""
    out = []
    for path in sorted(record.iterdir(), key=lambda p: int(p.name.split("-")[0])):
        _, kind, dims = path.name.split("-")
        out.append((kind, record_kv([int(d) for d in dims.split("x")], path.read_bytes())))
    return out


@pytest.mark.skipif(not _cpu_runs_fp8_kv(), reason="vLLM's fp8 KV cache on CPU needs AVX-512")
def test_an_fp8_kv_cache_is_saved_and_loaded_as_bytes(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A real quantized cache (e5m2 bytes, not floats) goes through save and load unchanged.

    The KV is compared, not the answers: the cold run computes the last prompt token in the
    prompt's batch and the warm run alone, which in bfloat16 may round apart (AMX kernels
    here), and with it greedy tokens of this random-weight model a few steps later.
    """
    ids = prompt_ids(8, PROMPT_LEN)
    extra = {"kv_cache_dtype": "fp8_e5m2", "dtype": "bfloat16"}
    record = tmp_path / "records"
    record.mkdir()
    (cold_cached, _), (warm_cached, _) = run_fresh_process(
        tiny_model_dir, tmp_path / "disk", ids, runs=2, record=record, **extra
    )
    assert cold_cached == 0
    assert warm_cached == PROMPT_LEN - 1
    (saved_kind, saved), (loaded_kind, loaded) = read_records(record)
    assert (saved_kind, loaded_kind) == ("save", "load")
    assert saved.shape[2] == PROMPT_LEN and loaded.shape[2] == PROMPT_LEN - 1
    assert saved[:, :, :FULL_BLOCKS].count_nonzero() > 0
    assert torch.equal(loaded[:, :, :FULL_BLOCKS], saved[:, :, :FULL_BLOCKS])
