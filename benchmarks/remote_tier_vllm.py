"""vLLM figures of `remote_tier.py --vllm`: TTFT served from the store, and the upload cost.

Three vLLM children, one after the other, on a config-only Llama (`--load-format
dummy`, like `benchmarks/ttft.py`), all on the same redis-server:

* writer: computes one 4K prompt per serde and uploads it (naive), then runs the no-reuse
  workload with uploads on; the values of the fp8 and cachegen prompts are then
  re-encoded in the store (`compress` in place, location RemoteBackend);
* reader (empty local tiers): TTFT of each serde's prompts served from the store, of the
  naive prompts again (warm, from its own CPU tier), and last of a prompt never seen
  (recompute: its KV is then uploaded in the background, which must not overlap the other
  figures); the median over PROMPTS distinct prompts per serde;
* baseline: the same no-reuse workload with the connector but no store.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from benchmarks._vllm_children import allocator, run_vllm_child
from examples import child_result

if TYPE_CHECKING:
    from vllm.config.model import ModelDType

    from lmc_connector.cache import ChunkLayout

ROOT = Path(__file__).resolve().parents[1]
SERDES = ("naive", "fp8", "cachegen")
CHUNK = 256


#: Distinct prompts per serde: TTFT figures are their median.
PROMPTS = 5
#: Rounds of the no-reuse workload per child, each on new prompts: the best one counts (the
#: writer and the baseline run minutes apart, and a shared host only ever slows a round down).
THROUGHPUT_ROUNDS = 4
#: Tokens of the warm-up prompt stored with each serde (the reader's first decode of a codec
#: pays for its set-up; the measured prompts must not).
WARM_UP_TOKENS = 512


def _prompt(serde: str, length: int, warm_up: bool = False, index: int = 0) -> list[int]:
    from ttft import _ids

    return _ids((600 if warm_up else 500 + 10 * index) + SERDES.index(serde), length)


def _prompts(serde: str, length: int) -> list[list[int]]:
    return [_prompt(serde, length, index=i) for i in range(PROMPTS)]


def _child(
    kind: str, model: str, url: str, prompt_len: int, work: dict[str, int], dtype: ModelDType
) -> None:
    from ttft import _ids
    from vllm import LLM, SamplingParams, TokensPrompt

    extra: dict[str, Any] = {"chunk_size": CHUNK, "max_local_cpu_size": 4}
    if kind != "baseline":
        extra["remote_url"] = url
    llm = LLM(
        model=model, load_format="dummy", dtype=dtype, enforce_eager=True, block_size=32,
        max_model_len=prompt_len + 64, enable_prefix_caching=False,
        max_num_batched_tokens=prompt_len + 64,
        kv_transfer_config={"kv_connector": "LMCConnectorV1", "kv_role": "kv_both",
                            "kv_connector_module_path": "lmc_connector.v1",
                            "kv_connector_extra_config": extra},
    )  # fmt: skip
    one = SamplingParams(max_tokens=1, temperature=0.0)

    def ttft(ids: list[int]) -> tuple[float, int]:
        start = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], one, use_tqdm=False)[0]
        return time.perf_counter() - start, out.num_cached_tokens or 0

    ttft(_ids(99, 256))  # warm-up
    result: dict[str, Any] = {}
    if kind == "reader":
        for serde in SERDES:
            ttft(_prompt(serde, WARM_UP_TOKENS, warm_up=True))
        for serde in SERDES:
            result[serde] = [ttft(ids) for ids in _prompts(serde, prompt_len)]
        result["warm"] = [ttft(ids) for ids in _prompts("naive", prompt_len)]
        result["recompute"] = ttft(_ids(777, prompt_len))
    else:
        if kind == "writer":
            for serde in SERDES:
                ttft(_prompt(serde, WARM_UP_TOKENS, warm_up=True))
                for ids in _prompts(serde, prompt_len):
                    ttft(ids)
        gen = SamplingParams(max_tokens=work["out"], temperature=0.0, ignore_eos=True)
        rates = []
        for round_ in range(THROUGHPUT_ROUNDS):
            seeds = range(3000 + 100 * round_, 3000 + 100 * round_ + work["reqs"])
            batch = [TokensPrompt(prompt_token_ids=_ids(s, work["len"])) for s in seeds]
            start = time.perf_counter()
            outs = llm.generate(batch, gen, use_tqdm=False)
            tokens = sum(len(o.prompt_token_ids or []) + len(o.outputs[0].token_ids) for o in outs)
            rates.append(tokens / (time.perf_counter() - start))
        result["throughput"] = max(rates)
    child_result.emit(result)


def _run(kind: str, model: str, url: str, prompt_len: int, work: dict[str, int], dtype: str) -> Any:
    code = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/benchmarks']\n"
        "from remote_tier_vllm import _child\n"
        "import json; _child(*json.loads(sys.argv[2]))\n"
    )
    args = json.dumps([kind, model, url, prompt_len, work, dtype])
    return run_vllm_child([sys.executable, "-c", code, str(ROOT), args], f"{kind} child",
                          kv_cache_gib=4, timeout=3600)  # fmt: skip


def _layout(model: str, shape: dict[str, int], dtype: str) -> ChunkLayout:
    """The chunk layout vLLM's workers give `model` (one rank, vLLM's attention
    backend on this machine: the layout fingerprint names it)."""
    from vllm.platforms import current_platform

    from lmc_connector.cache import ChunkLayout

    head = shape["hidden"] // shape["heads"]
    backend = "CPU_ATTN" if current_platform.is_cpu() else "FLASH_ATTN"
    return ChunkLayout(
        model, 1, 0, dtype, 2, shape["layers"], shape["kv_heads"] * head, CHUNK,
        backend=backend,
    )  # fmt: skip


def _reencode(url: str, layout: ChunkLayout, prompt_len: int) -> None:
    """Turn the fp8 and cachegen prompts' values into those codecs, in the store."""
    from lmc_connector.cache import CacheEngine
    from lmc_connector.config import load_config

    config = load_config({"chunk_size": CHUNK, "remote_url": url}, env={})
    engine = CacheEngine(config, layout)
    engine.open()
    for serde in SERDES[1:]:
        engine.compress(_prompt(serde, WARM_UP_TOKENS, warm_up=True), serde, "RemoteBackend")
        for ids in _prompts(serde, prompt_len):
            done = engine.compress(ids, serde, "RemoteBackend")
            if done < prompt_len:
                print(f"  (re-encoding a {serde} prompt covered {done} of {prompt_len} tokens)")
    engine.close()


def _stored_bytes(client: redis.Redis, layout: ChunkLayout, prompt_len: int) -> dict[str, int]:
    from lmc_connector.cache.tiers.remote.keys import StoreKeys
    from lmc_connector.tokens import chunk_hashes

    keys = StoreKeys(layout.fingerprint())
    out = {}
    for serde in SERDES:
        total = 0
        for key in chunk_hashes(_prompt(serde, prompt_len), CHUNK):
            total += sum(client.strlen(n) for n in client.scan_iter(keys.head(key) + "*"))
        out[serde] = total  # of the first prompt: all of one serde store about the same
    return out


def _median(runs: list[list[float]]) -> float:
    return statistics.median(seconds for seconds, _ in runs)


def _spread(runs: list[list[float]]) -> str:
    times = ", ".join(f"{seconds * 1e3:.1f}" for seconds, _ in runs)
    return f"median of {len(runs)} prompts, in the order sent: {times} ms"


def run_vllm_figures(
    url: str, client: redis.Redis, quick: bool, best_get_gbs: float, dtype: str = "bfloat16"
) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from ttft import FULL, QUICK, bench_model

    shape = QUICK if quick else FULL
    prompt_len = 2048 if quick else 4096
    work = {"reqs": 4 if quick else 8, "len": 512, "out": 16}
    model = bench_model(shape)
    print(f"\n4. vLLM: Llama {shape} (config only), {dtype}, a {prompt_len}-token prompt; "
          f"no-reuse workload {work['reqs']} x {work['len']} + {work['out']} tokens, best of "
          f"{THROUGHPUT_ROUNDS} rounds")  # fmt: skip
    print(f"  vLLM's processes allocate with {allocator()}")
    client.flushall()
    writer = _run("writer", model, url, prompt_len, work, dtype)
    heads = len(SERDES) * (PROMPTS * prompt_len + WARM_UP_TOKENS) // CHUNK
    deadline = time.monotonic() + 120
    while sum(1 for n in client.scan_iter("lmc:*") if n.endswith(b"}")) < heads:
        if time.monotonic() > deadline:
            raise RuntimeError("the writer's uploads did not all reach the store")
        time.sleep(0.5)
    layout = _layout(model, shape, dtype)
    _reencode(url, layout, prompt_len)
    stored = _stored_bytes(client, layout, prompt_len)
    reader = _run("reader", model, url, prompt_len, work, dtype)
    baseline = _run("baseline", model, url, prompt_len, work, dtype)
    recompute, warm = reader["recompute"][0], _median(reader["warm"])
    print(f"  TTFT recompute (fresh prompt)      : {recompute * 1e3:8.1f} ms")
    spread = _spread(reader["warm"])
    print(f"  TTFT warm local (own CPU tier)     : {warm * 1e3:8.1f} ms  ({spread})")
    for serde in SERDES:
        seconds, cached = _median(reader[serde]), min(c for _, c in reader[serde])
        bound = warm + stored[serde] / (best_get_gbs * 1e9)
        print(f"  TTFT from the store, {serde:<9}    : {seconds * 1e3:8.1f} ms  "
              f"({_spread(reader[serde])}; {stored[serde] / prompt_len:.0f} B/token stored, "
              f"{cached} cached tokens; {recompute / seconds:.1f}x faster than recompute; "
              f"target <= 1.5 x {bound * 1e3:.1f} ms: {seconds / bound:.2f}x)")  # fmt: skip
    cost = 1 - writer["throughput"] / baseline["throughput"]
    print(f"  no-reuse throughput: {baseline['throughput']:.1f} tok/s without the store, "
          f"{writer['throughput']:.1f} with uploads (cost {cost:.1%})")  # fmt: skip
