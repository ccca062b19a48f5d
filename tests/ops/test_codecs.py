"""Codec registry, round trips and error bounds for every codec, shape and dtype."""

from __future__ import annotations

import threading

import pytest
import torch

from lmc_connector.ops.codecs import (
    Codec,
    CodecError,
    UnknownCodecError,
    codec_names,
    decode_blob,
    get_codec,
    peek_header,
)

SHAPES = [
    (2, 3, 16, 64),  # K/V
    (1, 4, 16, 32),  # MLA latent
    (2, 2, 37, 24),  # tokens not a multiple of anything
    (2, 3, 1, 16),  # one token
    (2, 5, 12, 40),  # 12 tokens, odd layer count
]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def kv_like(
    shape: tuple[int, ...], dtype: torch.dtype = torch.float16, seed: int = 0
) -> torch.Tensor:
    """K/V-like data: per-channel offsets and spreads, a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    e, layers, _tokens, channels = shape
    offset = torch.randn(e, layers, 1, channels, generator=g)
    spread = torch.rand(e, layers, 1, channels, generator=g) + 0.2
    spread[..., :: max(1, channels // 4)] *= 6
    return (offset + spread * torch.randn(*shape, generator=g)).to(dtype)


def max_error_bound(name: str, kv: torch.Tensor) -> torch.Tensor:
    """Per-element worst-case reconstruction error of each codec, derived from its quantizer.

    cachegen: round to nearest of 2C+1 levels over [-s, s] with s <= absmax * 2^(1/8) (8-bit
    log scale codes) and C >= 6 for the default levels (13 levels in the last layer group), so
    |err| <= s / (2C). fp8 e4m3: 3 mantissa bits give relative error <= 2^-4 for normals and
    absolute error <= 2^-10 of the scale step for subnormals. Both plus the output dtype's
    rounding (bf16: 2^-9 relative)."""
    x = kv.float()
    rowmax = x.abs().amax(-1, keepdim=True)
    out_round = x.abs() * 2.0**-8 + 1e-6
    if name == "cachegen":
        return rowmax * 2 ** (1 / 8) / 12 * 1.001 + out_round
    return x.abs() * 2.0**-4 + rowmax / 440 * 2.0**-9 + out_round


def test_codec_names_lists_every_registered_codec() -> None:
    assert codec_names() == ["cachegen", "fp8", "kvtc"]


def test_unknown_codec_name_error_lists_registered_names() -> None:
    with pytest.raises(UnknownCodecError) as err:
        get_codec("cachegn")
    assert isinstance(err.value, ValueError)
    msg = str(err.value)
    assert "'cachegn'" in msg and "cachegen, fp8" in msg and "did you mean 'cachegen'" in msg


@pytest.mark.parametrize("name", ["cachegen", "fp8"])
def test_codec_objects_satisfy_the_protocol(name: str) -> None:
    codec = get_codec(name)
    assert isinstance(codec, Codec) and codec.name == name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", ["cachegen", "fp8"])
def test_round_trip_keeps_shape_dtype_and_error_bound(
    name: str, shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    kv = kv_like(shape, dtype)
    out = get_codec(name).decode(get_codec(name).encode(kv))
    assert out.shape == kv.shape and out.dtype == dtype and out.device.type == "cpu"
    err = (out.float() - kv.float()).abs()
    assert bool((err <= max_error_bound(name, kv)).all()), float(err.max())


@pytest.mark.parametrize(("name", "limit"), [("cachegen", 0.13), ("fp8", 0.04)])
def test_relative_l2_error_is_small_on_gaussian_data(name: str, limit: float) -> None:
    # cachegen: the absmax of 128 Gaussians is ~2.7 sigma (~2.9 after the scale code rounds
    # up); with C = 10, 8, 6 over the layer thirds the step is 0.29-0.49 sigma and the rounding
    # error step/sqrt(12), 0.112 sigma RMS. fp8: 2^-4/sqrt(3) ~ 0.036 relative at most.
    kv = torch.randn(2, 6, 64, 128, generator=torch.Generator().manual_seed(0)).half()
    out = decode_blob(get_codec(name).encode(kv)).float()
    rel = float((out - kv.float()).norm() / kv.float().norm())
    assert rel < limit


@pytest.mark.parametrize("name", ["cachegen", "fp8"])
def test_decode_blob_dispatches_on_the_header_codec(name: str) -> None:
    blob = get_codec(name).encode(kv_like((2, 2, 8, 16)))
    header = peek_header(blob)
    assert header.codec == name and header.shape == (2, 2, 8, 16)
    assert header.dtype == torch.float16 and header.total_size == len(blob)
    assert decode_blob(blob).shape == (2, 2, 8, 16)


def test_cachegen_compresses_kv_like_data_at_least_4x() -> None:
    kv = kv_like((2, 6, 128, 256))
    assert len(get_codec("cachegen").encode(kv)) * 4 < kv.numel() * 2


def test_fp8_is_about_half_of_fp16() -> None:
    kv = kv_like((2, 4, 64, 128))
    assert 1.9 < kv.numel() * 2 / len(get_codec("fp8").encode(kv)) <= 2.0


@pytest.mark.parametrize("name", ["cachegen", "fp8"])
def test_batch_encode_matches_single_encode(name: str) -> None:
    codec = get_codec(name)
    kvs = [kv_like((2, 3, 16, 32), seed=i) for i in range(3)] + [kv_like((1, 2, 5, 8))]
    blobs = codec.encode_batch(kvs)
    assert blobs == [codec.encode(kv) for kv in kvs]
    for kv, out in zip(kvs, codec.decode_batch(blobs), strict=True):
        assert torch.equal(out, codec.decode(codec.encode(kv)))


@pytest.mark.parametrize("name", ["cachegen", "fp8"])
def test_a_strided_view_encodes_like_its_contiguous_copy(name: str) -> None:
    codec = get_codec(name)
    view = kv_like((3, 2, 16, 32), seed=4).transpose(0, 1)  # K and V interleaved by layer
    assert not view.is_contiguous()
    assert codec.encode(view) == codec.encode(view.contiguous())


class Handouts:
    """An allocator that records the tensors it hands out (as the load path's buffers)."""

    def __init__(self) -> None:
        self.given: list[torch.Tensor] = []

    def __call__(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        self.given.append(torch.full(shape, float("nan"), dtype=dtype))
        return self.given[-1]


def decodes_into_what_allocate_gives(codec: Codec, kvs: list[torch.Tensor]) -> None:
    """decode_batch and decode with `allocate` write each chunk into the memory it gives and
    return the same values as without."""
    blobs = codec.encode_batch(kvs)
    handouts = Handouts()
    outs = [*codec.decode_batch(blobs, "cpu", handouts), codec.decode(blobs[0], "cpu", handouts)]
    assert len(handouts.given) == len(outs)
    for out, given, blob in zip(outs, handouts.given, [*blobs, blobs[0]], strict=True):
        assert out.data_ptr() == given.data_ptr()
        assert torch.equal(out, codec.decode(blob))


@pytest.mark.parametrize("name", ["cachegen", "fp8"])
def test_decoding_writes_into_the_memory_allocate_gives(name: str) -> None:
    kvs = [kv_like((2, 3, 16, 32), seed=i) for i in range(3)] + [kv_like((2, 3, 5, 32))]
    decodes_into_what_allocate_gives(get_codec(name), kvs)


@pytest.mark.parametrize("name", ["cachegen", "fp8"])
def test_decode_to_an_explicit_device(name: str) -> None:
    codec = get_codec(name)
    out = codec.decode(codec.encode(kv_like((2, 2, 4, 8))), device="cpu")
    assert out.device == torch.device("cpu")


@pytest.mark.parametrize("name", ["cachegen", "fp8"])
@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(2, 3, 4),
        torch.zeros(3, 2, 4, 8),
        torch.zeros(2, 2, 4, 8, dtype=torch.int32),
        torch.zeros(2, 0, 4, 8),
    ],
    ids=["rank3", "three-kinds", "int32", "empty"],
)
def test_wrong_input_is_a_clear_value_error(name: str, bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"KV chunk|dtype|empty"):
        get_codec(name).encode(bad)


def test_decoding_with_the_wrong_codec_is_a_codec_error() -> None:
    blob = get_codec("fp8").encode(kv_like((2, 2, 4, 8)))
    with pytest.raises(CodecError, match="fp8"):
        get_codec("cachegen").decode(blob)


def test_cachegen_rejects_invalid_levels() -> None:
    with pytest.raises(ValueError, match="odd"):
        get_codec("cachegen", levels=(16, 8))


@pytest.mark.parametrize("name", ["cachegen", "fp8"])
def test_concurrent_encode_decode_gives_the_same_bytes(name: str) -> None:
    codec = get_codec(name)
    kvs = [kv_like((2, 3, 32, 64), seed=i) for i in range(4)]
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
