"""Codec throughput over many distinct chunks (prints a table, asserts nothing).

MB/s are of fp16 input bytes; each chunk is encoded once and each blob decoded once (after a
warm-up on another chunk), and the table gives the median over chunks, next to a plain copy
(`clone`) of the same chunks in the same run. Shapes: an all-MiniLM-L6-v2 chunk
[2, 6, 256, 384] of real K/V over English text, and a Llama-3.1-8B chunk [2, 32, 256, 1024] of
synthetic K/V (per-channel offsets and scales, a few outlier channels; no such model here).
kvtc is calibrated on other MiniLM text and runs on the MiniLM shape only (a Llama-sized
transform needs a real calibration). "single" codes one chunk per call; "batch N" codes N
distinct chunks per call (consecutive chunks, wrapping around). The load average before and
after says what else was running; MB per CPU-second (all threads of this process) is
steadier than the wall clock on a busy machine.

    python benchmarks/codec_speed.py [--quick] [--device cpu|cuda] [--batch N] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmc_connector.ops.codecs import Codec, codec_names, fit_calibration, get_codec, is_calibrated
from lmc_connector.ops.codecs.rans import native_on

LLAMA = (2, 32, 256, 1024)


def kv_like(shape: tuple[int, ...], seed: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    e, layers, _tokens, channels = shape
    offset = torch.randn(e, layers, 1, channels, generator=g)
    spread = torch.rand(e, layers, 1, channels, generator=g) + 0.2
    spread[..., :: max(1, channels // 8)] *= 8
    x = offset + spread * torch.randn(*shape, generator=g)
    return x.half().to(device)


def minilm_chunks(
    count: int, train: int, device: str
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(test, calibration) chunks of real all-MiniLM-L6-v2 K/V from disjoint text."""
    from _kv_samples import MiniLM

    lm = MiniLM()
    test_ids, train_ids = lm.split(256, test=count, train=train)
    capture = lambda ids: lm.capture(ids).kv.half().to(device)  # noqa: E731
    return [capture(i) for i in test_ids], [capture(i) for i in train_ids]


def _clone(kvs: Sequence[torch.Tensor], i: int) -> torch.Tensor:
    return kvs[i].clone()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_mbps(
    fn: Callable[[int], object], count: int, mb: float, device: str
) -> tuple[float, float]:
    """Median MB/s of fn(i) over i = 1..count-1 (fn(0) warms up): by the wall clock, and per
    second of this process's CPU time (all its threads; steadier on a busy machine)."""
    fn(0)
    _sync(device)
    wall, cpu = [], []
    for i in range(1, count):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn(i)
        _sync(device)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return mb / statistics.median(wall), mb / max(statistics.median(cpu), 1e-9)


Rates = tuple[float, float]


def measure(
    codec: Codec, kvs: Sequence[torch.Tensor], batch: int, device: str
) -> tuple[Rates, Rates, Rates, Rates, float]:
    """(encode, decode, batched encode, batched decode) as (wall, CPU) MB/s, and the ratio,
    over distinct chunks."""
    mb = kvs[0].numel() * 2 / 2**20
    blobs = [codec.encode(kv) for kv in kvs]
    enc = median_mbps(lambda i: codec.encode(kvs[i]), len(kvs), mb, device)
    dec = median_mbps(lambda i: codec.decode(blobs[i], device), len(kvs), mb, device)
    n = len(kvs)
    groups = [[(g * batch + j) % n for j in range(batch)] for g in range(max(3, n // batch))]

    def enc_group(i: int) -> object:
        return codec.encode_batch([kvs[j] for j in groups[i]])

    def dec_group(i: int) -> object:
        return codec.decode_batch([blobs[j] for j in groups[i]], device)

    enc_b = median_mbps(enc_group, len(groups), batch * mb, device)
    dec_b = median_mbps(dec_group, len(groups), batch * mb, device)
    ratio = sum(kv.numel() * 2 for kv in kvs) / sum(len(b) for b in blobs)
    return enc, dec, enc_b, dec_b, ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer chunks")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    count = 9 if args.quick else 25
    load_before = os.getloadavg()
    minilm, calibration_chunks = minilm_chunks(count, 16, dev)
    llama = [kv_like(LLAMA, i, dev) for i in range(5 if args.quick else 9)]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {dev}, "
        f"native rANS coder: {native_on(torch.device(dev))}; load average before: "
        f"{load_before[0]:.2f}\n"
    )
    head = (
        f"{'shape':<13} {'codec':<9} {'mode':<8} {'chunks':>6} {'encode MB/s':>11} "
        f"{'decode MB/s':>11} {'copy MB/s':>10} {'ratio':>6}  {'enc / dec MB per CPU-s':>22}"
    )
    print(head)
    print("-" * len(head))
    for label, kvs in (("minilm-l6", minilm), ("llama-3.1-8b", llama)):
        mb = kvs[0].numel() * 2 / 2**20
        copy, _ = median_mbps(partial(_clone, kvs), len(kvs), mb, dev)
        for name in codec_names():
            params = {}
            if is_calibrated(name):
                if label != "minilm-l6":
                    continue
                params["calibration"] = fit_calibration(name, calibration_chunks)
            enc, dec, enc_b, dec_b, ratio = measure(get_codec(name, **params), kvs, args.batch, dev)
            for mode, (e, d) in (("single", (enc, dec)), (f"batch {args.batch}", (enc_b, dec_b))):
                print(
                    f"{label:<13} {name:<9} {mode:<8} {len(kvs):>6} {e[0]:>11.0f} {d[0]:>11.0f} "
                    f"{copy:>10.0f} {ratio:>6.2f}  {e[1]:>10.0f} / {d[1]:<10.0f}"
                )
    print(f"\nload average after: {os.getloadavg()[0]:.2f} (2 cores shared with other work: noisy)")


if __name__ == "__main__":
    main()
