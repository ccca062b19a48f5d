"""fp8's dequantizer in C (`_fp8.c`, built by native.py), with a checked fallback.

On a CPU, decoding to float32 or bfloat16 took five torch ops per slice (widen, shift,
carry the sign, convert, scale); here it is one sweep: each byte's value from a table of
256 floats that fp8.py built with those ops, times its row's multiplier, rounded once to
the output's dtype (1.5-2.8x faster). float16 stays with the torch ops, which write it in
place as fast. The results are the torch ops' bit for bit. `library()` is None where the
kernels could not be built or fail their self-test; fp8.py then runs its torch ops (as it
always does on a GPU).
"""

from __future__ import annotations

import ctypes

import torch

from lmc_connector.ops.codecs import native

_KINDS = {torch.float32: 0, torch.bfloat16: 1}
#: The output dtypes the kernel writes.
DTYPES = tuple(_KINDS)


def library() -> ctypes.CDLL | None:
    """The kernels library once its fp8 kernel passed the self-test, or None."""
    return native.checked("fp8 kernels", _self_test)


def dequantize(
    lib: ctypes.CDLL, q: torch.Tensor, mult: torch.Tensor, values: torch.Tensor, out: torch.Tensor
) -> None:
    """out [rows, channels] (one of DTYPES, contiguous) = values[q] * mult, for q [rows,
    channels] (uint8), mult [rows, 1] and values [256] (float32)."""
    rows, channels = q.shape
    assert out.is_contiguous() and out.shape == q.shape and values.numel() == 256
    mult = mult.to(torch.float32).contiguous()
    q = q.contiguous()
    bad = lib.lmc_fp8_dequant(q.data_ptr(), values.data_ptr(), mult.data_ptr(), rows, channels,
                              _KINDS[out.dtype], out.data_ptr())  # fmt: skip
    assert not bad


def _self_test(lib: ctypes.CDLL) -> bool:
    """The kernel against fp8.py's torch ops, on every byte value and scales of many sizes."""
    from lmc_connector.ops.codecs import fp8

    g = torch.Generator().manual_seed(0)
    rows, channels = 12, 256
    q = torch.randperm(rows * channels, generator=g).remainder(256).to(torch.uint8)
    q = q.view(rows, channels)
    mult = torch.exp2(torch.randint(-20, 12, (rows, 1), generator=g).float())
    mult *= torch.rand(rows, 1, generator=g) + 0.5
    for dtype in _KINDS:
        want, got = (
            torch.empty(rows, channels, dtype=dtype),
            torch.empty(rows, channels, dtype=dtype),
        )
        fp8.dequantize_torch(q, mult, want)
        dequantize(lib, q, mult, fp8.values(), got)
        if not torch.equal(
            want.view(torch.int16 if dtype != torch.float32 else torch.int32),
            got.view(torch.int16 if dtype != torch.float32 else torch.int32),
        ):
            return False
    return True
