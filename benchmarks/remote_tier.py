"""The shared-store tier (RemoteBackend) next to raw Redis on the same server, in one run.

Starts its own redis-server on loopback (`scripts/system_deps.sh` installs it) and prints:

1. put and get GB/s through the cache engine for 1, 8 and 32 MiB chunks (distinct random
   chunks, best of rounds): put = `put` of private chunks until their uploads are done,
   get = `get` with empty local tiers (read from the store into the CPU tier); next to raw
   `SET`/`GET` of the same bytes, one value per command, for 1, 8 and 32 MiB values on the
   same server (the best raw figure is the reference); after each round both sides delete
   what they wrote, so every round but the first writes into memory the server reuses;
2. lookup latency of 32-chunk prompts against the store (p50/p99; distinct prompts in
   turn) next to one raw pipelined round trip of 32 `EXISTS` of the same names;
3. bytes per token in the store for `naive`, `fp8` and `cachegen` (real all-MiniLM-L6-v2 K/V);
4. with `--vllm`: time to first token of a fresh instance (empty local tiers) for a 4K
   prompt served from the store, per serde, next to recompute and to a warm local hit;
   and the throughput of a no-reuse workload with and without uploads to the store
   (config-only Llama, `--load-format dummy`, like `benchmarks/ttft.py`).

Asserts nothing. `--quick` runs smaller sizes and fewer rounds.

    python benchmarks/remote_tier.py [--quick] [--vllm]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from lmc_connector import launch  # noqa: E402
from lmc_connector.cache import CacheEngine, ChunkLayout  # noqa: E402
from lmc_connector.cache.tiers.remote import RemoteBackend  # noqa: E402
from lmc_connector.config import load_config  # noqa: E402
from lmc_connector.tokens import ChunkKey  # noqa: E402

MiB = 1 << 20
#: Layers of a [2, layers, 256 tokens, 1024 channels] bf16 chunk: 1 MiB per layer.
SIZES_MIB = (1, 8, 32)


def best_seconds(rounds: int, fn: Callable[[int], None]) -> float:
    """Fastest of `rounds` calls of fn(round)."""
    best = float("inf")
    for r in range(rounds):
        start = time.perf_counter()
        fn(r)
        best = min(best, time.perf_counter() - start)
    return best


def engine_for(url: str, layout: ChunkLayout, **extra: object) -> CacheEngine:
    values = {"chunk_size": layout.chunk_size, "remote_url": url, "max_local_cpu_size": 0.1}
    config = load_config({**values, **extra}, env={})
    engine = CacheEngine(config, layout)
    engine.open()
    return engine


def store_tier(engine: CacheEngine) -> RemoteBackend:
    tier = engine.tier("RemoteBackend")
    assert isinstance(tier, RemoteBackend)
    return tier


class SizeCase:
    """One chunk size: its random chunks, a tier engine over them, and the best rates seen."""

    def __init__(self, url: str, mib: int, count: int, rounds: int) -> None:
        self.mib, self.count = mib, count
        self.layout = ChunkLayout("bench", 1, 0, "bfloat16", 2, mib, 1024, 256)
        self.chunks = [torch.randn(self.layout.shape(256)).to(torch.bfloat16) for _ in range(count)]
        self.data = [memoryview(c.view(torch.uint8).numpy().data).cast("B") for c in self.chunks]
        self.nbytes = count * mib * MiB
        self.engine = engine_for(url, self.layout, max_local_cpu_size=4 * self.nbytes / 1e9)
        self.tier = store_tier(self.engine)
        self.keys = [[ChunkKey(r * 10_000 + i + 1) for i in range(count)] for r in range(rounds)]
        self.best: dict[str, float] = {}

    def timed(self, what: str, fn: Callable[[], object]) -> None:
        start = time.perf_counter()
        fn()
        rate = self.nbytes / (time.perf_counter() - start) / 1e9
        self.best[what] = max(self.best.get(what, 0.0), rate)

    def run_round(self, client: redis.Redis, r: int) -> None:
        def raw_set() -> None:
            for i, value in enumerate(self.data):
                client.set(f"raw:{self.mib}:{r}:{i}", value)

        def raw_get() -> None:
            for i in range(self.count):
                client.get(f"raw:{self.mib}:{r}:{i}")

        fresh = [c.clone() for c in self.chunks]  # private tensors, as vLLM's save gathers

        def put() -> None:
            for key in self.keys[r]:
                self.engine.put(key, fresh.pop(0), copy=False)
            self.tier.flush()

        def get() -> None:
            assert len(self.engine.get(self.keys[r])) == self.count

        self.timed("raw SET", raw_set)
        self.timed("tier put", put)
        # Local tiers emptied: the get reads the store, into recycled CPU-tier buffers.
        self.engine.clear("LocalCPUBackend")
        self.timed("raw GET", raw_get)
        self.timed("tier get", get)
        # Both sides give their values back, so that the next round's writes land in memory
        # the server has used before (as in a store that evicts), not in fresh pages.
        client.unlink(*(f"raw:{self.mib}:{r}:{i}" for i in range(self.count)))
        self.engine.clear("RemoteBackend")


def throughput(url: str, client: redis.Redis, total_mib: int, rounds: int) -> float:
    """Prints the table; returns the best raw GET rate (GB/s)."""
    print(f"\n1. put/get through the tier vs raw SET/GET, one value per command ({total_mib} "
          f"MiB per size and round; best of {rounds} rounds, all sizes and sides interleaved; "
          "distinct chunks and keys)")  # fmt: skip
    cases = [SizeCase(url, mib, max(2, total_mib // mib), rounds) for mib in SIZES_MIB]
    for r in range(rounds):
        for case in cases:
            case.run_round(client, r)
    print(f"{'chunk':>8} {'raw SET':>9} {'raw GET':>9} {'tier put':>9} {'tier get':>9}  GB/s")
    for case in cases:
        b = case.best
        print(f"{case.mib:>5} MiB {b['raw SET']:9.2f} {b['raw GET']:9.2f} {b['tier put']:9.2f} "
              f"{b['tier get']:9.2f}")  # fmt: skip
        case.engine.close()
    best_set = max(c.best["raw SET"] for c in cases)
    best_get = max(c.best["raw GET"] for c in cases)
    print(f"best raw: SET {best_set:.2f} GB/s, GET {best_get:.2f} GB/s")
    for case in cases[1:]:
        print(f"tier/best raw at {case.mib} MiB: put {case.best['tier put'] / best_set:.0%}, "
              f"get {case.best['tier get'] / best_get:.0%}")  # fmt: skip
    client.flushall()
    return best_get


#: Distinct 32-chunk prompts the lookup latency cycles through.
LOOKUP_PROMPTS = 200


def lookups(url: str, client: redis.Redis, count: int) -> None:
    layout = ChunkLayout("bench-lookup", 1, 0, "bfloat16", 2, 1, 64, 16)
    writer = engine_for(url, layout)
    prompts = [list(range(p << 16, (p << 16) + 32 * 16)) for p in range(LOOKUP_PROMPTS)]
    for tokens in prompts:
        for i, key in enumerate(writer.hashes(tokens)):
            writer.put(key, torch.full(layout.shape(16), float(i)).to(torch.bfloat16))
    store_tier(writer).flush()
    reader = engine_for(url, layout)
    keys = [reader.hashes(tokens) for tokens in prompts]
    names = [[store_tier(reader).keys.head(k) for k in prompt] for prompt in keys]
    tier_times, raw_times = [], []
    for n in range(count):
        prompt = n % LOOKUP_PROMPTS
        start = time.perf_counter()
        hit = reader.lookup_keys(keys[prompt], 32 * 16)
        tier_times.append(time.perf_counter() - start)
        assert hit == 32 * 16
        start = time.perf_counter()
        pipe = client.pipeline(transaction=False)
        for name in names[prompt]:
            pipe.exists(name)
        pipe.execute()
        raw_times.append(time.perf_counter() - start)

    def show(label: str, times: list[float]) -> None:
        q = statistics.quantiles(times, n=100)
        print(f"{label:<34} p50 {q[49] * 1e3:6.3f} ms   p99 {q[98] * 1e3:6.3f} ms")

    print(f"\n2. lookup of a 32-chunk prompt, local tiers empty ({count} lookups over "
          f"{LOOKUP_PROMPTS} distinct prompts, in turn)")  # fmt: skip
    show("engine.lookup (store)", tier_times)
    show("raw pipelined EXISTS x 32", raw_times)
    writer.close()
    reader.close()


def bytes_per_token(url: str, client: redis.Redis, chunks: int) -> None:
    from _kv_samples import MiniLM, english_text

    lm = MiniLM()
    seqs = lm.sequences(english_text(10_000 * chunks), 256, chunks)
    kvs = [lm.capture(s).kv.to(torch.float16).contiguous() for s in seqs]
    _, layers, tokens, channels = kvs[0].shape
    layout = ChunkLayout("minilm", 1, 0, "float16", 2, layers, channels, tokens)
    plain = 2 * layers * channels * 2
    print(f"\n3. bytes per token in the store: all-MiniLM-L6-v2 K/V, {len(kvs)} chunks of "
          f"{tuple(kvs[0].shape)} fp16 (the tensor itself: {plain} B/token)")  # fmt: skip
    naive = 0.0
    for serde in ("naive", "fp8", "cachegen"):
        client.flushall()
        engine = engine_for(url, layout, remote_serde=serde)
        for i, kv in enumerate(kvs):
            engine.put(ChunkKey(i + 1), kv)
        store_tier(engine).flush()
        names = list(client.scan_iter("lmc:*"))
        payload = sum(client.strlen(n) for n in names)
        used = sum(client.memory_usage(n) or 0 for n in names)
        per_token = payload / (tokens * len(kvs))
        naive = naive or per_token
        with_redis = used / (tokens * len(kvs))
        print(f"  {serde:<9} {per_token:9.1f} B/token stored ({with_redis:.1f} with Redis's own "
              f"overhead), {naive / per_token:.2f}x smaller than naive")  # fmt: skip
        engine.close()
    client.flushall()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer rounds")
    parser.add_argument("--vllm", action="store_true", help="also TTFT and upload cost in vLLM")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="vLLM's dtype (float32 on CPUs without AVX512-BF16, where "
                        "bfloat16 runs on slow reference kernels)")  # fmt: skip
    args = parser.parse_args()
    total, rounds, lookups_n, chunks = (64, 2, 200, 4) if args.quick else (256, 3, 2000, 8)
    with tempfile.TemporaryDirectory() as tmp, launch.running_redis(Path(tmp)) as server:
        client = redis.Redis.from_url(server.url)
        print(f"redis-server {client.info('server')['redis_version']} on loopback, "
              f"client redis-py {redis.__version__} (hiredis parser)")  # fmt: skip
        best_get = throughput(server.url, client, total, rounds)
        lookups(server.url, client, lookups_n)
        bytes_per_token(server.url, client, chunks)
        if args.vllm:
            from remote_tier_vllm import run_vllm_figures

            run_vllm_figures(server.url, client, args.quick, best_get, args.dtype)
        client.close()


if __name__ == "__main__":
    main()
