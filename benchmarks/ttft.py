"""Time to first token with and without the connector, and the throughput cost of saving.

One run measures, for a long prompt (4K tokens by default) on a config-only
Llama served with `--load-format dummy` (random weights; prefill dominates on
a CPU):

* TTFT without the connector;
* TTFT with the connector on a cold cache (compute + save);
* TTFT with the connector on a warm cache (load + one token);

and the generation throughput on a workload with no reuse (distinct prompts),
without and with the connector (every prompt is saved, none is ever loaded).
Each configuration runs in its own child process so the two vLLM engines never
share memory. Prints figures; asserts nothing.

    python benchmarks/ttft.py            # hidden 1024, 8 layers, 4K-token prompt
    python benchmarks/ttft.py --quick    # hidden 512, 4 layers, 2K-token prompt
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.tiny_model import write_config_only_model  # noqa: E402

FULL = {"hidden": 1024, "layers": 8, "heads": 16, "kv_heads": 4, "intermediate": 2816}
#: Rounds of the no-reuse workload per child (the best counts).
WORK_ROUNDS = 3
#: Baseline and connector children run alternately this many times (the best counts), so
#: drifts of a shared machine hit both sides alike.
CHILD_ROUNDS = 2
QUICK = {"hidden": 512, "layers": 4, "heads": 8, "kv_heads": 2, "intermediate": 1408}


def _ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 1024) for _ in range(n)]


def _child(args: argparse.Namespace) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    kwargs: dict[str, Any] = dict(
        model=args.model,
        load_format="dummy",
        dtype=args.dtype,
        enforce_eager=True,
        block_size=32,
        max_model_len=args.prompt_len + 64,
        enable_prefix_caching=False,
        max_num_batched_tokens=args.prompt_len + 64,
    )
    if args.child == "connector":
        kwargs["kv_transfer_config"] = {
            "kv_connector": "LMCConnectorV1",
            "kv_connector_module_path": "lmc_connector.v1",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"chunk_size": 256, "max_local_cpu_size": 4},
        }
    llm = LLM(**kwargs)
    one = SamplingParams(max_tokens=1, temperature=0.0)

    def ttft(ids: list[int]) -> float:
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": ids}], one, use_tqdm=False)
        return time.perf_counter() - start

    ttft(_ids(99, 256))  # warm-up
    prompt = _ids(1, args.prompt_len)
    result: dict[str, Any] = {"first": ttft(prompt)}
    if args.child == "connector":
        result["second"] = ttft(prompt)
    # No-reuse workload: distinct prompts (seeds unused above), a few output tokens each;
    # the best of a few rounds, each with fresh prompts, so one-off warm-ups do not count.
    gen = SamplingParams(max_tokens=args.work_out, temperature=0.0, ignore_eos=True)
    rates, cached = [], 0
    for round_ in range(WORK_ROUNDS):
        seeds = range(1000 + 100 * round_, 1000 + 100 * round_ + args.work_reqs)
        work = [{"prompt_token_ids": _ids(seed, args.work_len)} for seed in seeds]
        start = time.perf_counter()
        outs = llm.generate(work, gen, use_tqdm=False)
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.prompt_token_ids or []) + len(o.outputs[0].token_ids) for o in outs)
        rates.append(tokens / elapsed)
        cached += sum(o.num_cached_tokens or 0 for o in outs)
    result["throughput"] = max(rates)
    result["cached_in_workload"] = cached
    return result


def _run_child(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", kind, "--model", args.model]
    cmd += ["--prompt-len", str(args.prompt_len), "--dtype", args.dtype]
    cmd += ["--work-reqs", str(args.work_reqs), "--work-len", str(args.work_len)]
    cmd += ["--work-out", str(args.work_out)]
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    # vLLM on CPU reserves one more core when any KV connector is configured; on a 2-core
    # machine that silently gives the worker both cores. Same binding on both sides.
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT ") :]))
    raise RuntimeError(f"{kind} run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller model and 2K prompt")
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--work-reqs", type=int, default=None)
    parser.add_argument("--work-len", type=int, default=512)
    parser.add_argument("--work-out", type=int, default=16)
    parser.add_argument("--model", default=None, help="model directory (default: written here)")
    parser.add_argument("--child", choices=["baseline", "connector"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prompt_len is None:
        args.prompt_len = 2048 if args.quick else 4096
    if args.work_reqs is None:
        args.work_reqs = 4 if args.quick else 8
    if args.child:
        print("RESULT " + json.dumps(_child(args)), flush=True)
        return
    shape = QUICK if args.quick else FULL
    if args.model is None:
        name = "bench-llama-" + "-".join(str(v) for v in shape.values())
        base = ROOT / ".models" if (ROOT / ".models").exists() else Path(tempfile.gettempdir())
        args.model = str(write_config_only_model(base / name, max_positions=8192, **shape))
    print(f"model: Llama {shape} (config only, --load-format dummy), dtype {args.dtype}")
    print(
        f"prompt: {args.prompt_len} tokens; no-reuse workload: {args.work_reqs} x "
        f"{args.work_len} prompt + {args.work_out} output tokens"
    )
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "connector": []}
    for _ in range(CHILD_ROUNDS):
        for kind, results in runs.items():
            results.append(_run_child(args, kind))
    base, conn = (
        {key: (max if key == "throughput" else min)(r[key] for r in results) for key in results[0]}
        for results in runs.values()
    )
    print(f"TTFT without connector : {base['first'] * 1000:9.1f} ms")
    print(f"TTFT connector, cold   : {conn['first'] * 1000:9.1f} ms")
    print(f"TTFT connector, warm   : {conn['second'] * 1000:9.1f} ms")
    print(
        f"warm/cold ratio        : {conn['second'] / conn['first']:9.3f}"
        f"  (speed-up vs no connector: {base['first'] / conn['second']:.1f}x)"
    )
    cost = 1 - conn["throughput"] / base["throughput"]
    print(
        f"throughput, no reuse   : {base['throughput']:9.1f} tok/s without, "
        f"{conn['throughput']:.1f} tok/s with the connector (saving costs {cost:.1%}; "
        f"cached tokens in workload: {conn['cached_in_workload']})"
    )


if __name__ == "__main__":
    main()
