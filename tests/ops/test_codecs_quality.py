"""cachegen and kvtc on real all-MiniLM-L6-v2 K/V meet their size and fidelity targets."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from lmc_connector.ops.codecs import fit_calibration, get_codec


def _kv_samples() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "_kv_samples.py"
    spec = importlib.util.spec_from_file_location("_kv_samples", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("_kv_samples", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def minilm_chunk() -> tuple[object, object, ModuleType]:
    kvs = _kv_samples()
    lm = kvs.MiniLM()
    (ids,) = lm.sequences(kvs.english_text(8_000), 256, 1)
    return lm, lm.capture(ids), kvs


def test_cachegen_meets_size_and_fidelity_targets_on_real_kv(minilm_chunk) -> None:  # type: ignore[no-untyped-def]
    lm, sample, kvs = minilm_chunk
    codec = get_codec("cachegen")
    blob = codec.encode(sample.kv.half())
    hat = codec.decode(blob).float()
    bits = len(blob) * 8 / sample.kv.numel()
    attn = kvs.attention_cosines(sample.queries, sample.kv, hat, lm.heads)
    emb = float(lm.embed(sample.input_ids) @ lm.embed(sample.input_ids, hat))
    assert bits <= 3.2
    assert float(attn.mean()) >= 0.99
    assert emb >= 0.995


def test_fp8_is_near_lossless_on_real_kv(minilm_chunk) -> None:  # type: ignore[no-untyped-def]
    lm, sample, kvs = minilm_chunk
    hat = get_codec("fp8").decode(get_codec("fp8").encode(sample.kv.half())).float()
    attn = kvs.attention_cosines(sample.queries, sample.kv, hat, lm.heads)
    assert float(attn.mean()) >= 0.999
    assert torch.isfinite(hat).all()


@pytest.fixture(scope="module")
def minilm_split() -> tuple[object, list[object], list[torch.Tensor], ModuleType]:
    """all-MiniLM-L6-v2, two test chunks and ten calibration chunks from other text."""
    kvs = _kv_samples()
    lm = kvs.MiniLM()
    test_ids, train_ids = lm.split(256, test=2, train=10)
    train = [lm.capture(ids).kv.half() for ids in train_ids]
    return lm, [lm.capture(ids) for ids in test_ids], train, kvs


def fidelity(lm, samples, codec, kvs) -> tuple[float, float, float]:  # type: ignore[no-untyped-def]
    """(compression ratio to fp16, mean attention-output cosine, mean embedding cosine)."""
    size, attn, emb = 0, [], []
    for sample in samples:
        blob = codec.encode(sample.kv.half())
        hat = codec.decode(blob).float()
        size += len(blob)
        attn.append(kvs.attention_cosines(sample.queries, sample.kv, hat, lm.heads))
        emb.append(float(lm.embed(sample.input_ids) @ lm.embed(sample.input_ids, hat)))
    ratio = sum(s.kv.numel() * 2 for s in samples) / size
    return ratio, float(torch.cat(attn).mean()), sum(emb) / len(emb)


def test_kvtc_calibrated_on_other_text_meets_the_targets(minilm_split) -> None:  # type: ignore[no-untyped-def]
    lm, samples, train, kvs = minilm_split
    codec = get_codec("kvtc", calibration=fit_calibration("kvtc", train))
    ratio, attn, emb = fidelity(lm, samples, codec, kvs)
    assert ratio >= 8 and attn >= 0.998 and emb >= 0.999, (ratio, attn, emb)


def test_kvtc_low_quality_reaches_16x_at_attention_cosine_099(minilm_split) -> None:  # type: ignore[no-untyped-def]
    lm, samples, train, kvs = minilm_split
    codec = get_codec("kvtc", calibration=fit_calibration("kvtc", train), quality=0.5)
    ratio, attn, _ = fidelity(lm, samples, codec, kvs)
    assert ratio >= 16 and attn >= 0.99, (ratio, attn)
