"""Every codec's C kernels (native.py builds them) decode the torch ops' KV, bit for bit."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

from lmc_connector.ops.codecs import cachegen_native, fp8_native, get_codec, native
from tests.ops.kernels import both_ways
from tests.ops.test_codecs import DTYPES, SHAPES, kv_like

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler: torch ops only")


@pytest.mark.parametrize(
    ("name", "kernels", "seed"), [("cachegen", cachegen_native, 1), ("fp8", fp8_native, 2)]
)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_decode_the_torch_ops_kv(
    name: str,
    kernels: ModuleType,
    seed: int,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    codec = get_codec(name)
    blob = codec.encode(kv_like(shape, dtype, seed=seed + sum(shape)))
    native, reference = both_ways(kernels, lambda: codec.decode(blob), monkeypatch)
    assert native.dtype == reference.dtype == dtype
    assert torch.equal(native.view(torch.uint8), reference.view(torch.uint8))
