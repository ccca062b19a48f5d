"""Codec quality on real all-MiniLM-L6-v2 K/V (prints a table, asserts nothing).

For every registered codec plus fp16 and int8 references: bits per element all-in (the whole
blob, header included), ratio to fp16, relative L2 error of K and V, attention-output cosine
(the model's own queries against reconstructed K/V; mean and 0.1% quantile), and the
sentence-embedding cosine when the model is re-run with every layer's K/V reconstructed.
Calibrated codecs (kvtc) are fitted on chunks of other text (the windows after the test
windows) and shown at several values of their quality knob.

    python benchmarks/codec_quality.py [--quick] [--chunks N] [--tokens T] [--train N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _kv_samples import MiniLM, attention_cosines
from _round_trips import RoundTrip, rounded, through_codec

from lmc_connector.ops.codecs import codec_names, fit_calibration, is_calibrated

KVTC_QUALITIES = (0.5, 1.5, 2.5, 3.5, 4.5, 6.0)


def _int8(kv: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Symmetric int8 with one fp16 absmax scale per (K/V, layer, token)."""
    scale = (kv.abs().amax(-1, keepdim=True) / 127).half().float().clamp_min(1e-12)
    q = torch.round(kv / scale).clamp(-127, 127)
    return q * scale, kv.numel() + scale.numel() * 2


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 chunks instead of 8")
    parser.add_argument("--chunks", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--train", type=int, default=16, help="calibration chunks")
    args = parser.parse_args()
    chunks = args.chunks or (2 if args.quick else 8)

    start = time.perf_counter()
    lm = MiniLM()
    test_ids, train_ids = lm.split(args.tokens, test=chunks, train=args.train)
    samples = [lm.capture(s) for s in test_ids]
    train = [lm.capture(s).kv.half() for s in train_ids]
    refs = [lm.embed(s.input_ids) for s in samples]
    print(
        f"all-MiniLM-L6-v2: {len(samples)} chunks of shape {list(samples[0].kv.shape)} "
        f"(K/V, layers, tokens, channels), English text from the Python stdlib; calibrations "
        f"fitted on {len(train)} chunks of other text; setup {time.perf_counter() - start:.1f}s\n"
    )
    methods: dict[str, RoundTrip] = {"fp16 (ref)": rounded(torch.float16), "int8 (ref)": _int8}
    for name in codec_names():
        if not is_calibrated(name):
            methods[name] = through_codec(name, torch.float16)
            continue
        blob = fit_calibration(name, train)
        for quality in KVTC_QUALITIES:
            methods[f"{name} q={quality:g}"] = through_codec(
                name, torch.float16, calibration=blob, quality=quality
            )
    head = (
        f"{'method':<12} {'bits/elem':>9} {'x fp16':>7} {'relL2 K':>8} {'relL2 V':>8} "
        f"{'attn cos':>9} {'attn q0.1%':>10} {'emb cos':>8}"
    )
    print(head)
    print("-" * len(head))
    for name, fn in methods.items():
        bits, cos, emb, err_k, err_v = 0.0, [], [], [], []
        for sample, ref in zip(samples, refs, strict=True):
            hat, size = fn(sample.kv)
            bits += size * 8 / sample.kv.numel() / len(samples)
            err_k.append(_rel_l2(sample.kv[0], hat[0]))
            err_v.append(_rel_l2(sample.kv[1], hat[1]))
            cos.append(attention_cosines(sample.queries, sample.kv, hat, lm.heads))
            emb.append(float(ref @ lm.embed(sample.input_ids, hat)))
        c = torch.cat(cos)
        print(
            f"{name:<12} {bits:>9.3f} {16 / bits:>7.2f} {sum(err_k) / len(err_k):>8.4f} "
            f"{sum(err_v) / len(err_v):>8.4f} {float(c.mean()):>9.5f} "
            f"{float(c.quantile(0.001)):>10.4f} {sum(emb) / len(emb):>8.5f}"
        )


if __name__ == "__main__":
    main()
