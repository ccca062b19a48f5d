"""kvtc: calibration, the codec's error bound in the transformed space, and the contract that a
blob decodes only with the calibration it names."""

from __future__ import annotations

import threading

import pytest
import torch

from lmc_connector.ops.codecs import (
    CalibrationStore,
    CodecError,
    MissingCalibrationError,
    calibration_id,
    decode_blob,
    fit_calibration,
    get_codec,
    parse_calibration,
    peek_header,
)
from lmc_connector.ops.codecs import kvtc_transform as transform
from tests.ops.kv_builders import attention_like
from tests.ops.test_codecs import decodes_into_what_allocate_gives

SHAPE = (2, 3, 40, 16)  # K/V, layers, tokens, channels


@pytest.fixture(scope="module")
def calibration() -> bytes:
    return fit_calibration("kvtc", attention_like(SHAPE, 6, seed=0))


def coefficient_error(kv: torch.Tensor, out: torch.Tensor, cal: bytes, quality: float) -> float:
    """max |c(kv) - c(out)| in steps over the coded components, computed in float32."""
    w = transform.weights(parse_calibration(cal), torch.device("cpu"), 2 ** (-quality / 2))

    def coefficients(x: torch.Tensor) -> torch.Tensor:
        joint = x.float().permute(1, 2, 0, 3).reshape(x.shape[1], x.shape[2], -1)
        return torch.baddbmm(w.bias, joint, w.enc, beta=-1)

    err = (coefficients(kv) - coefficients(out)).abs()
    return max(float(err[layer, :, :a].max()) for layer, a in enumerate(w.active))


# Round to nearest: half a step, plus the float16-stored basis being orthonormal only to ~1e-3
# (at most ~0.01 step at these magnitudes). With bfloat16 products (where the device has them
# fast) coefficients below _SPLIT sigma also carry up to ~2**-9 * 64 of output rounding each
# way; int8 inverse products add weights rounded to 1/254 of each output channel's largest.
PRECISIONS = [("float32", 0.02), ("bfloat16", 0.25), ("int8", 0.3)]


def use_precision(monkeypatch: pytest.MonkeyPatch, precision: str) -> None:
    monkeypatch.setattr(transform, "_fast_bfloat16", lambda _device: precision != "float32")
    monkeypatch.setattr(transform, "_fast_int8", lambda _device: precision == "int8")


@pytest.mark.parametrize(("precision", "slack"), PRECISIONS)
@pytest.mark.parametrize("quality", [1.0, 3.5, 6.0])
def test_coded_coefficients_are_within_half_a_step(
    calibration: bytes,
    quality: float,
    precision: str,
    slack: float,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_precision(monkeypatch, precision)
    kv = attention_like(SHAPE, 1, seed=7, dtype=torch.float32)[0]
    codec = get_codec("kvtc", calibration=calibration, quality=quality)
    out = codec.decode(codec.encode(kv))
    assert out.shape == kv.shape and out.dtype == torch.float32
    assert coefficient_error(kv, out, calibration, quality) <= 0.5 + slack


@pytest.mark.parametrize(("precision", "slack"), PRECISIONS)
def test_an_outlier_token_keeps_the_bound(
    calibration: bytes, precision: str, slack: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every component of token 5 becomes wide (shifted by k > 2): int8 products cannot hold
    # it, so its rows take the float32 way.
    use_precision(monkeypatch, precision)
    kv = attention_like(SHAPE, 1, seed=12, dtype=torch.float32)[0]
    kv[:, :, 5] += 60 * torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(0))
    codec = get_codec("kvtc", calibration=calibration, quality=3.5)
    out = codec.decode(codec.encode(kv))
    assert coefficient_error(kv, out, calibration, 3.5) <= 0.5 + slack


def test_higher_quality_is_larger_and_closer(calibration: bytes) -> None:
    kv = attention_like(SHAPE, 1, seed=8)[0]
    sizes, errors = [], []
    for quality in (1.0, 3.0, 5.0, 7.0):
        codec = get_codec("kvtc", calibration=calibration, quality=quality)
        blob = codec.encode(kv)
        sizes.append(len(blob))
        errors.append(float((codec.decode(blob).float() - kv.float()).norm()))
    assert sizes == sorted(sizes) and errors == sorted(errors, reverse=True)


def test_the_sink_token_is_kept_finer_than_the_others(calibration: bytes) -> None:
    kv = attention_like(SHAPE, 1, seed=9, dtype=torch.float32)[0]
    codec = get_codec("kvtc", calibration=calibration, quality=2.0)
    out = codec.decode(codec.encode(kv))
    err = (out - kv)[-1].norm(dim=-1)  # V, per layer and token
    assert float(err[:, 0].max()) < float(err[:, 1:].median()) / 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("tokens", [1, 7, 40, 300])
def test_round_trip_keeps_shape_and_dtype_for_any_token_count(
    calibration: bytes, dtype: torch.dtype, tokens: int
) -> None:
    kv = attention_like((2, 3, tokens, 16), 1, seed=tokens, dtype=dtype)[0]
    codec = get_codec("kvtc", calibration=calibration)
    out = codec.decode(codec.encode(kv))
    assert out.shape == kv.shape and out.dtype == dtype
    assert float((out.float() - kv.float()).norm() / kv.float().norm()) < 0.1


def test_mla_layout_with_one_plane() -> None:
    chunks = attention_like((1, 2, 64, 24), 4, seed=3)
    cal = fit_calibration("kvtc", chunks)
    codec = get_codec("kvtc", calibration=cal)
    out = codec.decode(codec.encode(chunks[0]))
    assert float((out.float() - chunks[0].float()).norm() / chunks[0].float().norm()) < 0.1


def test_non_finite_input_decodes_to_finite_values(calibration: bytes) -> None:
    kv = attention_like(SHAPE, 1, seed=4)[0]
    kv[0, 1, 3, 5], kv[1, 0, 2, 2] = float("nan"), float("inf")
    codec = get_codec("kvtc", calibration=calibration)
    assert bool(torch.isfinite(codec.decode(codec.encode(kv))).all())


def test_batch_encode_matches_single_encode(calibration: bytes) -> None:
    codec = get_codec("kvtc", calibration=calibration)
    kvs = [*attention_like(SHAPE, 3, seed=5), *attention_like((2, 3, 9, 16), 1, seed=6)]
    blobs = codec.encode_batch(kvs)
    assert blobs == [codec.encode(kv) for kv in kvs]
    for blob, out in zip(blobs, codec.decode_batch(blobs), strict=True):
        assert torch.equal(out, codec.decode(blob))


def test_a_strided_view_encodes_like_its_contiguous_copy(calibration: bytes) -> None:
    codec = get_codec("kvtc", calibration=calibration)
    (whole,) = attention_like((3, 2, 40, 16), 1, seed=7)
    view = whole.transpose(0, 1)  # K and V interleaved by layer
    assert not view.is_contiguous()
    assert codec.encode(view) == codec.encode(view.contiguous())


def test_decoding_writes_into_the_memory_allocate_gives(calibration: bytes) -> None:
    kvs = [*attention_like(SHAPE, 2, seed=7), *attention_like((2, 3, 9, 16), 1, seed=8)]
    decodes_into_what_allocate_gives(get_codec("kvtc", calibration=calibration), kvs)


def test_concurrent_encode_decode_gives_the_same_bytes(calibration: bytes) -> None:
    codec = get_codec("kvtc", calibration=calibration)
    kvs = attention_like(SHAPE, 4, seed=10)
    expected = [codec.encode(kv) for kv in kvs]
    results: dict[int, bool] = {}

    def work(i: int) -> None:
        blob = codec.encode(kvs[i])
        results[i] = blob == expected[i] and torch.equal(
            codec.decode(blob), codec.decode(expected[i])
        )

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: True for i in range(4)}


# -- the calibration contract ------------------------------------------------------------------


def test_blob_header_names_its_calibration(calibration: bytes) -> None:
    blob = get_codec("kvtc", calibration=calibration).encode(attention_like(SHAPE, 1, 1)[0])
    header = peek_header(blob)
    assert header.codec == "kvtc"
    assert header.calibration_id == calibration_id(calibration) == parse_calibration(calibration).id
    assert (
        peek_header(get_codec("fp8").encode(attention_like(SHAPE, 1, 1)[0])).calibration_id is None
    )


def test_a_codec_without_calibration_says_how_to_get_one() -> None:
    with pytest.raises(MissingCalibrationError, match="fit_calibration") as err:
        get_codec("kvtc")
    assert err.value.calibration_id is None


def test_decoding_without_the_calibration_is_a_miss(calibration: bytes) -> None:
    blob = get_codec("kvtc", calibration=calibration).encode(attention_like(SHAPE, 1, 2)[0])
    with pytest.raises(MissingCalibrationError) as err:
        decode_blob(blob)
    assert err.value.calibration_id == calibration_id(calibration)
    with pytest.raises(MissingCalibrationError):
        decode_blob(blob, calibrations=CalibrationStore())


def test_decoding_with_another_calibration_is_a_miss(calibration: bytes) -> None:
    other = fit_calibration("kvtc", attention_like(SHAPE, 6, seed=99))
    assert calibration_id(other) != calibration_id(calibration)
    blob = get_codec("kvtc", calibration=calibration).encode(attention_like(SHAPE, 1, 2)[0])
    with pytest.raises(MissingCalibrationError):
        get_codec("kvtc", calibration=other).decode(blob)
    with pytest.raises(MissingCalibrationError):
        decode_blob(blob, calibrations={calibration_id(other): other})


def test_a_source_that_returns_the_wrong_calibration_is_refused(calibration: bytes) -> None:
    other = fit_calibration("kvtc", attention_like(SHAPE, 6, seed=98))
    blob = get_codec("kvtc", calibration=calibration).encode(attention_like(SHAPE, 1, 2)[0])
    with pytest.raises(CodecError, match="was given for id"):
        decode_blob(blob, calibrations={calibration_id(calibration): other})
    with pytest.raises(CodecError, match="was given for id"):
        decode_blob(blob, calibrations=CalibrationStore(loader=lambda _id: other))


@pytest.mark.parametrize("how", ["store", "loader", "dict"])
def test_decode_blob_finds_the_calibration(calibration: bytes, how: str) -> None:
    kv = attention_like(SHAPE, 1, 3)[0]
    codec = get_codec("kvtc", calibration=calibration)
    blob = codec.encode(kv)
    asked: list[str] = []

    def loader(cid: str) -> bytes | None:
        asked.append(cid)
        return calibration if cid == calibration_id(calibration) else None

    if how == "store":
        source: object = CalibrationStore()
        source.add(calibration)  # type: ignore[attr-defined]
    elif how == "loader":
        source = CalibrationStore(loader=loader)
    else:
        source = {calibration_id(calibration): calibration}
    out = decode_blob(blob, calibrations=source)  # type: ignore[arg-type]
    assert torch.equal(out, codec.decode(blob))
    if how == "loader":
        assert asked == [calibration_id(calibration)] and calibration_id(calibration) in source  # type: ignore[operator]


def test_encoding_a_chunk_of_another_layout_says_to_calibrate(calibration: bytes) -> None:
    codec = get_codec("kvtc", calibration=calibration)
    with pytest.raises(ValueError, match="calibrate for this layout"):
        codec.encode(attention_like((2, 4, 40, 16), 1, 0)[0])


@pytest.mark.parametrize("quality", [-1.0, 16.5])
def test_quality_out_of_range_is_refused(calibration: bytes, quality: float) -> None:
    with pytest.raises(ValueError, match="quality"):
        get_codec("kvtc", calibration=calibration, quality=quality)


def test_calibrating_needs_enough_tokens_and_one_layout() -> None:
    with pytest.raises(ValueError, match="at least 32 tokens"):
        fit_calibration("kvtc", attention_like((2, 3, 8, 16), 2, seed=0))
    mixed = [*attention_like(SHAPE, 2, 0), *attention_like((2, 3, 40, 8), 1, 0)]
    with pytest.raises(ValueError, match="layout"):
        fit_calibration("kvtc", mixed)
    with pytest.raises(ValueError, match="takes no calibration"):
        fit_calibration("cachegen", attention_like(SHAPE, 2, 0))


def test_calibration_is_deterministic_and_named_by_its_content() -> None:
    chunks = attention_like(SHAPE, 3, seed=11)
    a, b = fit_calibration("kvtc", chunks), fit_calibration("kvtc", chunks)
    assert a == b and calibration_id(a) == calibration_id(b)
    assert calibration_id(fit_calibration("kvtc", chunks[:2] + chunks[:1])) != calibration_id(a)
