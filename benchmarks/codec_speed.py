"""Codec throughput on CPU (or CUDA with --device cuda): prints a table, asserts nothing.

MB/s are of fp16 input bytes, for a Llama-3.1-8B chunk [2, 32, 256, 1024] and an
all-MiniLM-L6-v2 chunk [2, 6, 256, 384], one chunk at a time and batched, next to a plain
copy of the same bytes in the same run. Inputs are random K/V with per-channel offsets and
scales and a few outlier channels (real K/V statistics matter for the ratio, not the speed;
see codec_quality.py for real K/V). Peak memory is the process's max RSS growth (CPU) or
torch's peak allocation (CUDA) around each codec's runs.

    python benchmarks/codec_speed.py [--quick] [--device cpu|cuda] [--batch N]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmc_connector.ops.codecs import Codec, codec_names, get_codec

SHAPES = {"llama-3.1-8b": (2, 32, 256, 1024), "minilm-l6": (2, 6, 256, 384)}


def kv_like(shape: tuple[int, ...], seed: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    e, layers, _tokens, channels = shape
    offset = torch.randn(e, layers, 1, channels, generator=g)
    spread = torch.rand(e, layers, 1, channels, generator=g) + 0.2
    spread[..., :: max(1, channels // 8)] *= 8
    x = offset + spread * torch.randn(*shape, generator=g)
    return x.half().to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_time(fn: Callable[[], object], repeats: int, device: str) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def _peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller batch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=None)
    args = parser.parse_args()
    repeats = 2 if args.quick else 5
    batch = args.batch or (2 if args.quick else 4)
    dev = args.device
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {dev}\n")
    head = (
        f"{'shape':<13} {'codec':<9} {'mode':<9} {'encode MB/s':>11} {'decode MB/s':>11} "
        f"{'copy MB/s':>10} {'ratio':>6} {'peak MB':>8}"
    )
    print(head)
    print("-" * len(head))
    for label, shape in SHAPES.items():
        kvs = [kv_like(shape, i, dev) for i in range(batch)]
        mb = kvs[0].numel() * 2 / 2**20
        copy = mb / best_time(kvs[0].clone, repeats, dev)
        for name in codec_names():
            codec = get_codec(name)
            if dev.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            before = _peak_mb(dev)
            blob = codec.encode(kvs[0])
            blobs = codec.encode_batch(kvs)

            def enc1(c: Codec = codec, k: list[torch.Tensor] = kvs) -> object:
                return c.encode(k[0])

            def dec1(c: Codec = codec, b: bytes = blob) -> object:
                return c.decode(b, dev)

            def encb(c: Codec = codec, k: list[torch.Tensor] = kvs) -> object:
                return c.encode_batch(k)

            def decb(c: Codec = codec, b: list[bytes] = blobs) -> object:
                return c.decode_batch(b, dev)

            enc = mb / best_time(enc1, repeats, dev)
            dec = mb / best_time(dec1, repeats, dev)
            enc_b = batch * mb / best_time(encb, repeats, dev)
            dec_b = batch * mb / best_time(decb, repeats, dev)
            peak = _peak_mb(dev) - (0 if dev.startswith("cuda") else before)
            ratio = kvs[0].numel() * 2 / len(blob)
            for mode, e_, d_ in (("single", enc, dec), (f"batch {batch}", enc_b, dec_b)):
                print(
                    f"{label:<13} {name:<9} {mode:<9} {e_:>11.0f} {d_:>11.0f} {copy:>10.0f} "
                    f"{ratio:>6.2f} {peak:>8.0f}"
                )


if __name__ == "__main__":
    main()
