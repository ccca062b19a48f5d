"""Put/get throughput of the chunk cache next to a plain tensor copy of the same bytes.

Prints GB/s for each and the ratio; never asserts. The default chunk is a
Llama-3.1-8B chunk: 2 x 32 layers x 256 tokens x 8 heads x 128 dims, bf16 (32 MiB).

    python benchmarks/cache_throughput.py [--chunks 16] [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from collections.abc import Callable

import torch

from lmc_connector.cache import CacheEngine, ChunkLayout
from lmc_connector.config import load_config
from lmc_connector.tokens import ChunkKey

LLAMA_8B = ChunkLayout("llama-3.1-8b", 1, 0, "bfloat16", 2, 32, 8 * 128, 256)


def best_rate(nbytes: int, rounds: int, fn: Callable[[], None]) -> float:
    """Best GB/s over `rounds` runs of `fn`, which moves `nbytes`."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="4 chunks, 2 rounds")
    args = parser.parse_args()
    n, rounds = (4, 2) if args.quick else (args.chunks, args.rounds)
    layout = LLAMA_8B
    shape = layout.shape(layout.chunk_size)
    sources = [torch.randn(shape).to(torch.bfloat16) for _ in range(n)]
    chunk_bytes = sources[0].numel() * sources[0].element_size()
    total = n * chunk_bytes
    dest = torch.empty(shape, dtype=torch.bfloat16)
    copies = [torch.empty_like(s) for s in sources]
    print(f"chunk {tuple(shape)} bf16 = {chunk_bytes / 2**20:.0f} MiB, {n} chunks per round")

    def plain_copy() -> None:
        for src, dst in zip(sources, copies, strict=True):
            dst.copy_(src)

    copy_rate = best_rate(total, rounds, plain_copy)

    # A full tier in steady state: every put evicts the least recently used chunk.
    config = load_config({"max_local_cpu_size": (total + chunk_bytes // 2) / 1e9}, env={})
    engine = CacheEngine(config, layout)
    next_key = iter(range(1, 1 << 30))
    keys: list[ChunkKey] = []

    def put_all() -> None:
        keys.clear()
        for src in sources:
            keys.append(ChunkKey(next(next_key)))
            assert engine.put(keys[-1], src)

    def get_all() -> None:
        assert len(engine.get(keys)) == n

    def get_into() -> None:
        for kv in engine.get(keys):
            dest.copy_(kv)

    put_all()
    put_rate = best_rate(total, rounds, put_all)
    get_rate = best_rate(total, rounds, get_all)
    get_copy_rate = best_rate(total, rounds, get_into)
    with tempfile.TemporaryDirectory() as disk_dir:
        disk_config = load_config(
            {"local_cpu": False, "local_disk": disk_dir, "max_local_disk_size": 2 * total / 1e9},
            env={},
        )
        disk = CacheEngine(disk_config, layout)
        disk.open()

        def disk_put() -> None:
            disk.clear()
            for key, src in zip(keys, sources, strict=True):
                assert disk.put(key, src)

        def disk_get() -> None:
            assert len(disk.get(keys)) == n

        disk_put_rate = best_rate(total, rounds, disk_put)
        disk_get_rate = best_rate(total, rounds, disk_get)

    rows = [
        ("plain tensor copy", copy_rate),
        ("put (full tier, evicting)", put_rate),
        ("get (zero-copy read)", get_rate),
        ("get + copy to destination", get_copy_rate),
        ("disk put (write + CRC32)", disk_put_rate),
        ("disk get (read + verify)", disk_get_rate),
    ]
    print(f"{'operation':<30}{'GB/s':>10}{'vs copy':>10}")
    for name, rate in rows:
        print(f"{name:<30}{rate:>10.2f}{rate / copy_rate:>9.2f}x")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak resident memory: {peak:.2f} GiB (sources {total / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
