"""How much more context a full CPU tier serves when it compresses before it evicts.

Through real vLLM on the CPU: distinct long prompts, requested with
Zipf-distributed reuse, whose KV is about three times the CPU tier (or
`--working-set-per-tier` times). Each
configuration runs in its own child process on the same request sequence:

* plain LRU eviction;
* `compress_before_evict: cachegen` (and any other codec named with --methods). A codec that
  needs a calibration (kvtc) is calibrated first in its child, through a controller
  (`POST /calibrate`), on CALIBRATION_PROMPTS other prompts, whose chunks are then cleared.

Prints hit tokens, hit rate and mean / p50 time to first token per
configuration; asserts nothing. The model is a config-only Llama served with
`--load-format dummy` (random weights: prefill cost is real, answers are not).

    python benchmarks/capacity.py [--quick] [--methods cachegen,kvtc] [--working-set-per-tier 8]
                                  [--zipf 0.8]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._vllm_children import allocator, run_vllm_child  # noqa: E402
from benchmarks.ttft import FULL, QUICK, kv_bytes  # noqa: E402
from examples import child_result  # noqa: E402
from examples.tiny_model import write_config_only_model  # noqa: E402
from lmc_connector import launch  # noqa: E402

#: Zipf exponent of prompt popularity (1 = classic Zipf; larger = hotter head).
ZIPF_S = 1.1
CHUNK_SIZE = 256
#: Prompts (not among the measured ones) cached to calibrate a codec that needs it.
CALIBRATION_PROMPTS = 4
INSTANCE = "capacity"
SEED = 7


def requests(num_prompts: int, num_requests: int, seed: int, zipf_s: float) -> list[int]:
    """Prompt indices drawn with Zipf(`zipf_s`) popularity (a fixed sequence per seed)."""
    rng = random.Random(seed)
    weights = [1 / (rank + 1) ** zipf_s for rank in range(num_prompts)]
    order = list(range(num_prompts))
    rng.shuffle(order)
    return [order[i] for i in rng.choices(range(num_prompts), weights, k=num_requests)]


def prompt_ids(index: int, length: int) -> list[int]:
    rng = random.Random(10_000 + index)
    return [rng.randrange(3, 1024) for _ in range(length)]


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration's run (in its own process); calibrated codecs get a controller."""
    from lmc_connector.cache.calibrations import calibrated_methods

    if args.child not in calibrated_methods():
        return _serve(args, None)
    port, monitor, worker = launch.free_port(), launch.free_port(), launch.free_port()
    url = f"http://127.0.0.1:{port}"
    command = launch.controller_command("127.0.0.1", port, monitor)
    with (
        tempfile.TemporaryDirectory() as logs,
        launch.running("lmc-controller", command, url, Path(logs) / "controller.log", timeout=60),
    ):
        extra = {
            "enable_controller": True,
            "lmcache_instance_id": INSTANCE,
            "controller_pull_url": f"127.0.0.1:{monitor}",
            "lmcache_worker_ports": worker,
        }
        return _serve(args, url, extra)


def _serve(
    args: argparse.Namespace, controller: str | None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    from vllm import LLM, SamplingParams, TokensPrompt

    extra = {"chunk_size": CHUNK_SIZE, "max_local_cpu_size": args.cpu_gb, **(extra or {})}
    if args.child != "plain":
        extra["compress_before_evict"] = args.child
    llm = LLM(
        model=args.model,
        load_format="dummy",
        dtype="bfloat16",
        enforce_eager=True,
        block_size=32,
        max_model_len=args.prompt_len + 64,
        max_num_batched_tokens=args.prompt_len + 64,
        enable_prefix_caching=False,
        kv_transfer_config={
            "kv_connector": "LMCConnectorV1",
            "kv_connector_module_path": "lmc_connector.v1",
            "kv_role": "kv_both",
            "kv_connector_extra_config": extra,
        },
    )
    one = SamplingParams(max_tokens=1, temperature=0.0)
    warm_up = TokensPrompt(prompt_token_ids=prompt_ids(-1, 256))
    llm.generate([warm_up], one, use_tqdm=False)
    if controller is not None:
        calibrate(llm, one, controller, args)
    seconds, hits = [], []
    sequence = requests(args.prompts, args.requests, SEED, args.zipf)
    for n, index in enumerate(sequence, 1):
        start = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=prompt_ids(index, args.prompt_len))], one,
                           use_tqdm=False)  # fmt: skip
        seconds.append(time.perf_counter() - start)
        hits.append(out[0].num_cached_tokens or 0)
        if n % 20 == 0:
            print(f"{args.child}: {n}/{len(sequence)} requests", file=sys.stderr, flush=True)
    return {"seconds": seconds, "hits": hits}


def calibrate(llm: Any, params: Any, controller: str, args: argparse.Namespace) -> None:
    """Cache CALIBRATION_PROMPTS other prompts, calibrate `args.child` on them, clear."""
    from vllm import TokensPrompt

    from lmc_connector.control.admin.client import ControllerClient
    from lmc_connector.control.admin.follow import follow

    for i in range(CALIBRATION_PROMPTS):
        prompt = TokensPrompt(prompt_token_ids=prompt_ids(-2 - i, args.prompt_len))
        llm.generate([prompt], params, use_tqdm=False)
    with ControllerClient(controller, timeout=60) as client:
        event_id = client.calibrate(INSTANCE, args.child)["event_id"]
        event = follow(client, event_id, limit=600.0, progress=False)
        if event["status"] == "failed":
            raise RuntimeError(f"calibration failed: {event['error']}")
        part = event["workers"][0]
        print(
            f"{args.child}: calibrated on {part['chunks_done']} chunks ({part['num_tokens']} "
            f"tokens) in {part['seconds']:.1f} s",
            file=sys.stderr,
            flush=True,
        )
        client.clear(INSTANCE)


def run_child(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", kind, "--model", args.model]
    cmd += ["--prompt-len", str(args.prompt_len), "--prompts", str(args.prompts)]
    cmd += ["--requests", str(args.requests), "--cpu-gb", str(args.cpu_gb)]
    cmd += ["--zipf", str(args.zipf)]
    return dict(run_vllm_child(cmd, f"{kind} run", kv_cache_gib=2, timeout=7200, show_log=True))


def report(kind: str, result: dict[str, Any], prompt_len: int, base: dict[str, Any]) -> str:
    hits, seconds = result["hits"], result["seconds"]
    total = len(hits) * prompt_len
    gain = sum(hits) / max(1, sum(base["hits"]))
    return (
        f"| {kind} | {sum(hits):,} | {100 * sum(hits) / total:.1f}% | {gain:.2f}x | "
        f"{1000 * statistics.mean(seconds):.0f} | {1000 * statistics.median(seconds):.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model and workload")
    parser.add_argument("--methods", default="cachegen", help="codecs to compare, comma list")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--prompts", type=int, default=24, help="distinct prompts")
    parser.add_argument("--requests", type=int, default=80, help="requests in the sequence")
    parser.add_argument(
        "--zipf", type=float, default=ZIPF_S, help="Zipf exponent of prompt popularity"
    )
    parser.add_argument("--cpu-gb", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--working-set-per-tier",
        type=float,
        default=3.0,
        help="the KV working set over the CPU tier's size (3: a third of it fits)",
    )
    args = parser.parse_args()
    if args.child:
        child_result.emit(child(args))
        return
    shape = QUICK if args.quick else FULL
    if args.quick:
        args.prompts, args.requests, args.prompt_len = 16, 40, 512
    working_set = args.prompts * kv_bytes(shape, args.prompt_len, "bfloat16")
    args.cpu_gb = working_set / args.working_set_per_tier / 1e9
    with tempfile.TemporaryDirectory() as tmp:
        args.model = str(write_config_only_model(Path(tmp) / "model", **shape))
        print(
            f"{args.prompts} prompts x {args.prompt_len} tokens, {args.requests} Zipf({args.zipf}) "
            f"requests; KV working set {working_set / 1e6:.0f} MB, CPU tier "
            f"{args.cpu_gb * 1e3:.0f} MB; vLLM allocates with {allocator()}",
            flush=True,
        )
        results = {kind: run_child(args, kind) for kind in ["plain", *args.methods.split(",")]}
    print("| CPU tier | hit tokens | hit rate | vs plain LRU | mean TTFT ms | p50 TTFT ms |")
    print("|---|---|---|---|---|---|")
    for kind, result in results.items():
        name = "plain LRU" if kind == "plain" else f"compress_before_evict: {kind}"
        print(report(name, result, args.prompt_len, results["plain"]))
    most = most_hits(requests(args.prompts, args.requests, SEED, args.zipf), args.prompt_len)
    share = sum(results["plain"]["hits"]) / max(1, most)
    print(f"The most any cache could hit here: {most:,} tokens (every repeat request served "
          f"whole but its last token); plain LRU reaches {share:.0%} of it, so no cache can "
          f"beat plain LRU by more than {1 / max(share, 1e-9):.2f}x on this sequence (lower "
          "--zipf or more --requests leave more room).")  # fmt: skip


def most_hits(sequence: list[int], prompt_len: int) -> int:
    """Hit tokens of a cache that never evicts: every request of a prompt seen before, less
    the last token (vLLM computes it to sample the next)."""
    seen: set[int] = set()
    total = 0
    for index in sequence:
        total += prompt_len - 1 if index in seen else 0
        seen.add(index)
    return total


if __name__ == "__main__":
    main()
