"""Time to first token against its floor and its peers, and what saving costs, in one run.

For a long prompt (4K tokens by default) on a config-only Llama served with
`--load-format dummy` (random weights; prefill dominates on a CPU), side by
side in one run:

* recompute: TTFT with no cache at all;
* vLLM's own prefix cache: TTFT of a repeated prompt (a hit in vLLM's blocks);
* vLLM's `ExampleConnector` (its in-tree connector, saving to disk): warm TTFT;
* this connector: cold TTFT (compute + hand the save over) and warm TTFT (load + one token);
* the floor: one decode step at the same context length (what any hit must still pay),
  plus the prompt's KV bytes at this machine's memcpy speed;
* how long vLLM's worker was blocked in `wait_for_save` for the saved prompt, and the
  background copy it no longer waits for;
* generation throughput on a workload with no reuse (distinct prompts), without and
  with this connector (every prompt saved, none loaded).

Each configuration runs in its own child process (two vLLM engines never share
memory), alternately, twice; the best of each counts. Prints a table; asserts
nothing. Timings on a shared machine are noisy: compare within one run.

    python benchmarks/ttft.py            # hidden 1024, 8 layers, 4K-token prompt
    python benchmarks/ttft.py --quick    # hidden 512, 4 layers, 2K-token prompt
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._vllm_children import allocator, run_vllm_child  # noqa: E402
from examples import child_result  # noqa: E402
from examples.tiny_model import write_config_only_model  # noqa: E402

FULL = {"hidden": 1024, "layers": 8, "heads": 16, "kv_heads": 4, "intermediate": 2816}
QUICK = {"hidden": 512, "layers": 4, "heads": 8, "kv_heads": 2, "intermediate": 1408}
#: Rounds of the no-reuse workload per child (the best counts).
WORK_ROUNDS = 3
#: Children of each kind run alternately this many times (the best counts), so drifts of a
#: shared machine hit every side alike.
CHILD_ROUNDS = 2
#: Tokens generated to time decode steps at the prompt's context length.
DECODE_STEPS = 8
KINDS = ("baseline", "prefix", "example", "connector")


def bench_model(shape: dict[str, int]) -> str:
    """The config-only Llama of `shape` (written once, under .models/ or the temp folder)."""
    name = "bench-llama-" + "-".join(str(v) for v in shape.values())
    base = ROOT / ".models" if (ROOT / ".models").exists() else Path(tempfile.gettempdir())
    return str(write_config_only_model(base / name, max_positions=8192, **shape))


def _ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 1024) for _ in range(n)]


class ConnectorProbe:
    """vLLM worker extension: this connector's worker-side timings (`lmc_stats`)."""

    def lmc_stats(self) -> dict[str, float]:
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        worker = get_kv_transfer_group().worker  # type: ignore[attr-defined]
        assert worker.saver is not None and worker.saver.drain()
        saver = worker.saver.stats
        return {
            "save_calls": saver.handoff_steps,
            "save_seconds": saver.handoff_seconds,
            "stored": saver.stored,
            "copy_seconds": saver.copy_seconds,
            "dropped": saver.dropped_full + saver.dropped_preempted + saver.failed,
        }


def _engine_kwargs(args: argparse.Namespace, kind: str, tmp: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        model=args.model,
        load_format="dummy",
        dtype=args.dtype,
        enforce_eager=True,
        block_size=32,
        max_model_len=args.prompt_len + 64,
        enable_prefix_caching=kind == "prefix",
        max_num_batched_tokens=args.prompt_len + 64,
    )
    if kind == "connector":
        kwargs["worker_extension_cls"] = "ttft.ConnectorProbe"
        kwargs["kv_transfer_config"] = {
            "kv_connector": "LMCConnectorV1",
            "kv_connector_module_path": "lmc_connector.v1",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"chunk_size": 256, "max_local_cpu_size": 4},
        }
    if kind == "example":
        kwargs["kv_transfer_config"] = {
            "kv_connector": "ExampleConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"shared_storage_path": tmp},
        }
    return kwargs


def _child(args: argparse.Namespace) -> dict[str, Any]:
    from vllm import LLM, SamplingParams, TokensPrompt

    tmp = tempfile.mkdtemp(prefix="ttft-example-")
    llm = LLM(**_engine_kwargs(args, args.child, tmp))

    def timed(ids: list[int], tokens: int = 1) -> float:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)
        return time.perf_counter() - start

    timed(_ids(99, 256))  # warm-up
    prompt = _ids(1, args.prompt_len)
    before = llm.collective_rpc("lmc_stats")[0] if args.child == "connector" else {}
    result: dict[str, Any] = {"first": timed(prompt)}
    if args.child == "connector":
        # What saving this one prompt cost vLLM's worker, and what ran in the background.
        after = llm.collective_rpc("lmc_stats")[0]
        result["stats"] = {key: after[key] - before[key] for key in after}
    if args.child != "baseline":
        result["second"] = timed(prompt)
    if args.child == "prefix":
        # Both served from vLLM's prefix cache: the difference is the decode steps alone.
        one, more = timed(prompt), timed(prompt, 1 + DECODE_STEPS)
        result["decode_step"] = (more - one) / DECODE_STEPS
    if args.child in ("baseline", "connector"):
        result.update(_no_reuse_throughput(llm, args))
    return result


def _no_reuse_throughput(llm: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Distinct prompts, a few output tokens each; the best of a few rounds, each with fresh
    prompts, so one-off warm-ups do not count."""
    from vllm import SamplingParams, TokensPrompt

    gen = SamplingParams(max_tokens=args.work_out, temperature=0.0, ignore_eos=True)
    rates, cached = [], 0
    for round_ in range(WORK_ROUNDS):
        seeds = range(1000 + 100 * round_, 1000 + 100 * round_ + args.work_reqs)
        work = [TokensPrompt(prompt_token_ids=_ids(seed, args.work_len)) for seed in seeds]
        start = time.perf_counter()
        outs = llm.generate(work, gen, use_tqdm=False)
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.prompt_token_ids or []) + len(o.outputs[0].token_ids) for o in outs)
        rates.append(tokens / elapsed)
        cached += sum(o.num_cached_tokens or 0 for o in outs)
    return {"throughput": max(rates), "cached_in_workload": cached}


def _run_child(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", kind, "--model", args.model]
    cmd += ["--prompt-len", str(args.prompt_len), "--dtype", args.dtype]
    cmd += ["--work-reqs", str(args.work_reqs), "--work-len", str(args.work_len)]
    cmd += ["--work-out", str(args.work_out)]
    return dict(run_vllm_child(cmd, f"{kind} run", kv_cache_gib=4, timeout=3600))


def _memcpy_gbs() -> float:
    """Best of a few copies of 256 MiB on this machine, in GB/s."""
    import torch

    src = torch.ones(256 * 2**20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return src.numel() / best / 1e9


def kv_bytes(shape: dict[str, int], prompt_len: int, dtype: str) -> int:
    head = shape["hidden"] // shape["heads"]
    element = 4 if dtype == "float32" else 2
    return 2 * shape["layers"] * shape["kv_heads"] * head * prompt_len * element


def _best(results: list[dict[str, Any]]) -> dict[str, Any]:
    best: dict[str, Any] = {}
    for key in results[0]:
        values = [r[key] for r in results]
        if key == "stats":
            best[key] = min(values, key=lambda s: s["save_seconds"])
        else:
            best[key] = (max if key == "throughput" else min)(values)
    return best


def _report(args: argparse.Namespace, shape: dict[str, int], runs: dict[str, Any]) -> None:
    base, prefix, example, conn = (_best(runs[k]) for k in KINDS)
    kv = kv_bytes(shape, args.prompt_len, args.dtype)
    copy_gbs = _memcpy_gbs()
    floor = prefix["decode_step"] + kv / (copy_gbs * 1e9)
    rows = [
        ("recompute (no cache)", base["first"]),
        ("vLLM prefix-cache hit", prefix["second"]),
        ("vLLM ExampleConnector, warm", example["second"]),
        ("lmc_connector, cold (compute + save)", conn["first"]),
        ("lmc_connector, warm", conn["second"]),
        ("floor: one decode step", prefix["decode_step"]),
        (f"floor + {kv / 1e6:.0f} MB of KV at {copy_gbs:.1f} GB/s", floor),
    ]
    print(f"{'time to first token':42s} {'ms':>9s} {'x floor':>8s}")
    for name, seconds in rows:
        print(f"{name:42s} {seconds * 1000:9.1f} {seconds / floor:8.2f}")
    stats = conn["stats"]
    print(
        f"saving the {args.prompt_len}-token prompt blocked vLLM's worker "
        f"{stats['save_seconds'] * 1000:.3f} ms in wait_for_save ({stats['save_calls']:.0f} "
        f"steps); {stats['stored']:.0f} chunks were copied in the background in "
        f"{stats['copy_seconds'] * 1000:.1f} ms ({stats['dropped']:.0f} dropped)"
    )
    cost = 1 - conn["throughput"] / base["throughput"]
    print(
        f"throughput, no reuse: {base['throughput']:.1f} tok/s without, "
        f"{conn['throughput']:.1f} tok/s with the connector (saving costs {cost:.1%}; "
        f"cached tokens in workload: {conn['cached_in_workload']})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller model and 2K prompt")
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--work-reqs", type=int, default=None)
    parser.add_argument("--work-len", type=int, default=512)
    parser.add_argument("--work-out", type=int, default=16)
    parser.add_argument("--model", default=None, help="model directory (default: written here)")
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prompt_len is None:
        args.prompt_len = 2048 if args.quick else 4096
    if args.work_reqs is None:
        args.work_reqs = 4 if args.quick else 8
    if args.child:
        child_result.emit(_child(args))
        return
    shape = QUICK if args.quick else FULL
    if args.model is None:
        args.model = bench_model(shape)
    print(f"model: Llama {shape} (config only, --load-format dummy), dtype {args.dtype}; "
          f"vLLM allocates with {allocator()}")  # fmt: skip
    print(
        f"prompt: {args.prompt_len} tokens; no-reuse workload: {args.work_reqs} x "
        f"{args.work_len} prompt + {args.work_out} output tokens"
    )
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    for _ in range(CHILD_ROUNDS):
        for kind, results in runs.items():
            results.append(_run_child(args, kind))
    _report(args, shape, runs)


if __name__ == "__main__":
    main()
