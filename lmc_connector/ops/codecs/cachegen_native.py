"""CacheGen's bulk passes in C (`_cachegen.c`, built by native.py), with a checked fallback.

On a CPU, quantizing a chunk took about ten torch ops over float32 temporaries (scale,
round, two sums, offset, a transposing copy) and dequantizing four; here each is one or two
sweeps over the chunk. The results are the torch ops' bit for bit: the same blobs, the same
decoded KV. `library()` is None where the kernels could not be built or fail their self-test;
cachegen.py then runs its torch ops (as it always does on a GPU).

Chunks are seen as rows of `tokens` x `channels`: row r = (b * groups + g) * per + p is
block g * per + p of chunk b, where a chunk's (K/V, layer) blocks are split into `groups`
parts of `per` blocks; the coder's symbols are step-major, [per * tokens, chunks,
groups * channels].
"""

from __future__ import annotations

import ctypes

import torch

from lmc_connector.ops.codecs import native

#: Elements per slice of bulk float32 work on a CPU (bounded temporaries: ~8 MB): the
#: quantizer's conversions here, and cachegen's torch ops where the kernels are missing.
SLICE_ELEMS = 1 << 21
_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def library() -> ctypes.CDLL | None:
    """The kernels library once its CacheGen kernels passed the self-test, or None."""
    return native.checked("CacheGen kernels", _self_test)


def quantize(
    lib: ctypes.CDLL, x: torch.Tensor, factor: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q = round(x * factor) (int8) of rows x [rows, tokens, channels] (CPU, any float dtype)
    with factor [rows, tokens] (float32), and the per-row, per-channel sums of q and q * q
    over tokens (int32 [rows, channels])."""
    rows, tokens, channels = x.shape
    q = torch.empty((rows, tokens, channels), dtype=torch.int8)
    s1 = torch.empty((rows, channels), dtype=torch.int32)
    s2 = torch.empty((rows, channels), dtype=torch.int32)
    factor = factor.to(torch.float32).contiguous()
    step = max(1, SLICE_ELEMS // max(1, tokens * channels))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        xs = x[r0:r1].to(torch.float32).contiguous()
        lib.lmc_cg_quantize(
            xs.data_ptr(), r1 - r0, tokens, channels, factor[r0:r1].data_ptr(),
            q[r0:r1].data_ptr(), s1[r0:r1].data_ptr(), s2[r0:r1].data_ptr(),
        )  # fmt: skip
    return q, s1, s2


def codes(
    lib: ctypes.CDLL, q: torch.Tensor, off: torch.Tensor, nb: int, groups: int, per: int
) -> torch.Tensor:
    """The coder's int16 codes [per * tokens, nb, groups * channels]: q + off, for q [rows,
    tokens, channels] (int8) and off [rows, channels] (int16)."""
    rows, tokens, channels = q.shape
    assert rows == nb * groups * per and q.is_contiguous()
    off = off.to(torch.int16).contiguous()
    out = torch.empty((per * tokens, nb, groups * channels), dtype=torch.int16)
    lib.lmc_cg_codes(q.data_ptr(), off.data_ptr(), nb, groups, per, tokens, channels,
                     out.data_ptr())  # fmt: skip
    return out


def dequantize(
    lib: ctypes.CDLL,
    syms: torch.Tensor,
    off: torch.Tensor,
    step: torch.Tensor,
    groups: int,
    out: torch.Tensor,
    chunk: int,
) -> None:
    """Chunk `chunk` of the decoded symbols syms [per * tokens, nb, groups * channels] (uint8)
    into out (contiguous, `tokens` x `channels` rows in [groups, per] order; float32,
    bfloat16 or float16): (sym + off) * step, with off [rows, channels] and step [rows,
    tokens] (float32, that chunk's rows)."""
    steps, nb, width = syms.shape
    rows, tokens = step.shape
    channels, per = width // groups, rows // groups
    assert syms.is_contiguous() and out.is_contiguous() and steps == per * tokens
    assert out.numel() == rows * tokens * channels
    off = off.to(torch.float32).contiguous()
    step = step.to(torch.float32).contiguous()
    bad = lib.lmc_cg_dequant(
        syms.data_ptr(), off.data_ptr(), step.data_ptr(), nb, chunk, groups, per, tokens,
        channels, _KINDS[out.dtype], out.data_ptr(),
    )  # fmt: skip
    assert not bad


def _self_test(lib: ctypes.CDLL) -> bool:
    """The kernels against the torch ops they replace, on a small random chunk."""
    g = torch.Generator().manual_seed(0)
    nb, groups, per, tokens, channels = 2, 3, 2, 5, 7
    rows = nb * groups * per
    x = torch.randn(rows, tokens, channels, generator=g) * 6
    factor = torch.rand(rows, tokens, generator=g) * 2
    want = (x * factor.unsqueeze(-1)).round()
    q, s1, s2 = quantize(lib, x, factor)
    if not (torch.equal(q.float(), want) and torch.equal(s1.float(), want.sum(1))
            and torch.equal(s2.float(), (want * want).sum(1))):  # fmt: skip
        return False
    off = torch.randint(-9, 40, (rows, channels), generator=g, dtype=torch.int16)
    layout = (want + off.unsqueeze(1)).view(nb, groups, per, tokens, channels)
    layout = layout.permute(2, 3, 0, 1, 4).reshape(per * tokens, nb, groups * channels)
    if not torch.equal(codes(lib, q, off, nb, groups, per).float(), layout):
        return False
    syms = torch.randint(0, 60, (per * tokens, nb, groups * channels), generator=g)
    syms = syms.to(torch.uint8)
    offs = torch.randn(rows, channels, generator=g)
    steps = torch.rand(rows, tokens, generator=g)
    by_row = syms.view(per, tokens, nb, groups, channels).permute(2, 3, 0, 1, 4)
    by_row = by_row.reshape(nb, groups * per, tokens, channels).float()
    for dtype in _KINDS:
        for b in range(nb):
            rs = slice(b * groups * per, (b + 1) * groups * per)
            expect = ((by_row[b] + offs[rs].unsqueeze(1)) * steps[rs].unsqueeze(-1)).to(dtype)
            got = torch.empty_like(expect)
            dequantize(lib, syms, offs[rs], steps[rs], groups, got, b)
            if not torch.equal(got, expect):
                return False
    return True
