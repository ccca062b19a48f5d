"""CacheGen's C kernels give the torch ops' blobs and decoded KV, bit for bit."""

from __future__ import annotations

import pytest
import torch

from lmc_connector.ops.codecs import cachegen_native, get_codec, native
from tests.ops.kernels import both_ways
from tests.ops.test_codecs import DTYPES, SHAPES, kv_like

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler: torch ops only")
NATIVE = cachegen_native.library()


def test_kernels_pass_their_self_test_where_the_library_builds() -> None:
    assert NATIVE is not None


@pytest.fixture
def torch_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """Within the test, cachegen runs its torch ops, as on a GPU or without a compiler."""
    monkeypatch.setattr(cachegen_native, "library", lambda: None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_encode_the_torch_ops_blob(
    shape: tuple[int, ...], dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    codec = get_codec("cachegen")
    kv = kv_like(shape, dtype, seed=sum(shape))
    native, reference = both_ways(cachegen_native, lambda: codec.encode(kv), monkeypatch)
    assert native == reference


def test_kernels_agree_on_a_batch_and_on_non_finite_input(monkeypatch: pytest.MonkeyPatch) -> None:
    codec = get_codec("cachegen")
    kvs = [kv_like((2, 4, 32, 48), torch.float16, seed=s) for s in range(3)]
    kvs[1][0, 2, 5, 7] = float("nan")
    kvs[2][1, 0, 3, 1] = float("-inf")
    blobs, reference = both_ways(cachegen_native, lambda: codec.encode_batch(kvs), monkeypatch)
    assert blobs == reference
    native, torch_kv = both_ways(cachegen_native, lambda: codec.decode_batch(blobs), monkeypatch)
    for a, b in zip(native, torch_kv, strict=True):
        assert torch.equal(a, b)


def test_kernels_decode_into_the_memory_allocate_gives() -> None:
    codec = get_codec("cachegen")
    kv = kv_like((2, 3, 16, 64), torch.bfloat16)
    blob = codec.encode(kv)
    given = torch.full(kv.shape, 7.0, dtype=kv.dtype)
    out = codec.decode(blob, allocate=lambda shape, dtype: given)
    assert out.data_ptr() == given.data_ptr()
    assert torch.equal(out, codec.decode(blob))


def test_quantize_rounds_halves_to_even_like_torch() -> None:
    assert NATIVE is not None
    x = torch.tensor([[[0.5, 1.5, 2.5, -0.5, -1.5, 3.49, -7.51, 14.5]]])
    q, s1, s2 = cachegen_native.quantize(NATIVE, x, torch.ones(1, 1))
    assert q.flatten().tolist() == torch.round(x).flatten().int().tolist()
    assert s1.flatten().tolist() == torch.round(x).flatten().int().tolist()
    assert s2.flatten().tolist() == (torch.round(x) ** 2).flatten().int().tolist()


def test_without_kernels_the_codec_still_round_trips(torch_ops: None) -> None:
    codec = get_codec("cachegen")
    kv = kv_like((2, 3, 16, 64), torch.float32)
    out = codec.decode(codec.encode(kv))
    assert (out - kv).abs().max() < kv.abs().max() / 10


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dequantize_rounds_like_torch_from_subnormals_to_overflow(dtype: torch.dtype) -> None:
    assert NATIVE is not None
    g = torch.Generator().manual_seed(3)
    per, tokens, channels = 2, 256, 64
    syms = torch.randint(0, 60, (per * tokens, 1, channels), generator=g).to(torch.uint8)
    off = torch.randn(per, channels, generator=g) * 3
    step = torch.exp2(torch.rand(per, tokens, generator=g) * 46 - 30)  # 2**-30 .. 2**16
    by_row = syms.view(per, tokens, channels).float()
    want = ((by_row + off.unsqueeze(1)) * step.unsqueeze(-1)).to(dtype)
    got = torch.empty_like(want)
    cachegen_native.dequantize(NATIVE, syms, off, step, 1, got, 0)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    if dtype == torch.float16:
        assert bool(got.isinf().any()) and bool((got.abs() < 2**-14).logical_and(got != 0).any())
