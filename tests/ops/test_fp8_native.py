"""fp8's C dequantizer gives the torch ops' decoded KV, bit for bit."""

from __future__ import annotations

import pytest
import torch

from lmc_connector.ops.codecs import fp8, fp8_native, get_codec, native
from tests.ops.test_codecs import kv_like

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler: torch ops only")
NATIVE = fp8_native.library()


def test_kernel_passes_its_self_test_where_the_library_builds() -> None:
    assert NATIVE is not None


@pytest.mark.parametrize("dtype", fp8_native.DTYPES)
def test_every_byte_value_scales_like_torch_from_tiny_to_huge_multipliers(
    dtype: torch.dtype,
) -> None:
    """All 256 e4m3 bytes (NaN's included: fp8.py reads them as finite numbers) on rows whose
    multipliers run from 2**-30 to 2**16."""
    assert NATIVE is not None
    g = torch.Generator().manual_seed(5)
    rows = 64
    q = torch.arange(256).repeat(rows, 1).to(torch.uint8)
    mult = torch.exp2(torch.rand(rows, 1, generator=g) * 46 - 30)
    want, got = torch.empty(rows, 256, dtype=dtype), torch.empty(rows, 256, dtype=dtype)
    fp8.dequantize_torch(q, mult, want)
    fp8_native.dequantize(NATIVE, q, mult, fp8.values(), got)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_kernel_decodes_into_the_memory_allocate_gives() -> None:
    codec = get_codec("fp8")
    kv = kv_like((2, 3, 16, 64), torch.float32)
    blob = codec.encode(kv)
    given = torch.full(kv.shape, 7.0, dtype=kv.dtype)
    out = codec.decode(blob, allocate=lambda shape, dtype: given)
    assert out.data_ptr() == given.data_ptr()
    assert torch.equal(out, codec.decode(blob))
    assert (out - kv).abs().max() < kv.abs().max() / 10
