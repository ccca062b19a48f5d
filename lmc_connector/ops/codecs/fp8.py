"""`fp8`: e4m3 values with one fp32 scale per (K/V, layer, token); about 2x smaller than fp16."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from lmc_connector.ops.allocator import Allocator
from lmc_connector.ops.codecs import format as fmt
from lmc_connector.ops.codecs import fp8_native
from lmc_connector.ops.codecs._tensors import from_bytes, resolve_device, to_bytes
from lmc_connector.ops.codecs.errors import CodecError
from lmc_connector.ops.codecs.registry import codec_id

CODEC_ID = codec_id("fp8")
# A little under e4m3's max (448) so the rounded product never overflows to NaN.
_TARGET = 440.0
_PARAMS = b"\x00"  # scale mode 0: per (K/V, layer, token)
_SLICE_ELEMS = 1 << 18  # CPU decode slices: stay in cache


class Fp8Codec:
    name = "fp8"

    def encode(self, kv: torch.Tensor) -> bytes:
        fmt.check_kv(kv)
        work = kv if kv.dtype == torch.float16 else kv.float()
        amax = kv.abs().amax(-1, keepdim=True).float()
        inv = (_TARGET / amax.clamp_min(1e-30)).clamp_max(
            6e4 if kv.dtype == torch.float16 else 1e30
        )
        q = (work * inv.to(work.dtype)).to(torch.float8_e4m3fn)
        scale = (1.0 / inv).reshape(-1)
        return fmt.pack(CODEC_ID, kv.dtype, kv.shape, _PARAMS, [to_bytes(scale), to_bytes(q)])

    def decode(
        self,
        blob: bytes | memoryview,
        device: torch.device | str | None = None,
        allocate: Allocator | None = None,
    ) -> torch.Tensor:
        from lmc_connector.ops.codecs.registry import peek_header

        header = peek_header(blob)
        if header.codec != self.name:
            raise CodecError(f"blob holds codec {header.codec!r}, not {self.name!r}")
        if header.params != _PARAMS:
            raise CodecError(f"unsupported fp8 parameters {header.params!r}")
        e, layers, tokens, _channels = header.shape
        rows = e * layers * tokens
        fmt.expect_sections(header, [4 * rows, header.numel])
        scale_buf, value_buf = header.sections(blob)
        dev = resolve_device(device)
        scale = from_bytes(scale_buf, torch.float32, rows, dev)
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise CodecError("fp8 blob has non-finite or negative scales")
        with warnings.catch_warnings():  # read-only view of the blob: only ever read
            warnings.simplefilter("ignore")
            q = torch.from_numpy(np.frombuffer(value_buf, dtype=np.uint8, count=header.numel))
        out = (allocate or _empty(dev))(header.shape, header.dtype)
        return _dequantize(q.to(dev), scale, out)

    def encode_batch(self, kvs: Sequence[torch.Tensor]) -> list[bytes]:
        return [self.encode(kv) for kv in kvs]

    def decode_batch(
        self,
        blobs: Sequence[bytes | memoryview],
        device: torch.device | str | None = None,
        allocate: Allocator | None = None,
    ) -> list[torch.Tensor]:
        return [self.decode(b, device, allocate) for b in blobs]


def _empty(device: torch.device) -> Allocator:
    return lambda shape, dtype: torch.empty(shape, dtype=dtype, device=device)


def _dequantize(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """e4m3 bytes [numel] (uint8) times the row scales, into `out` (its shape and dtype):
    in one sweep of C on a CPU where the kernel writes that dtype and passed its self-test
    (fp8_native.py), else with torch ops slice by slice; the same values either way."""
    shape, channels = out.shape, out.shape[-1]
    rows = q.numel() // channels
    out, q = out.view(rows, channels), q.view(rows, channels)
    mult = (scale * 256).view(rows, 1)
    native = q.device.type == "cpu" and out.dtype in fp8_native.DTYPES
    lib = fp8_native.library() if native else None
    if lib is not None:
        fp8_native.dequantize(lib, q, mult, values(), out)
    else:
        dequantize_torch(q, mult, out)
    return out.view(shape)


def dequantize_torch(q: torch.Tensor, mult: torch.Tensor, out: torch.Tensor) -> None:
    """out [rows, channels] = the values of q [rows, channels] (uint8) times mult [rows, 1],
    slice by slice (torch ops: any device)."""
    rows, channels = q.shape
    bits = out.view(torch.int16) if out.dtype == torch.float16 else None
    step = rows if q.device.type != "cpu" else max(1, _SLICE_ELEMS // channels)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        w = bits[r0:r1] if bits is not None else torch.empty_like(q[r0:r1], dtype=torch.int16)
        halves = _halves(q[r0:r1], w)
        if bits is not None:
            out[r0:r1].mul_(mult[r0:r1].to(torch.float16))
        else:
            out[r0:r1].copy_(halves.float().mul_(mult[r0:r1]))


@functools.cache
def values() -> torch.Tensor:
    """The float32 value (times 2**-8) of each of the 256 e4m3 bytes, as `_halves` reads it."""
    codes = torch.arange(256, dtype=torch.int16).to(torch.uint8)
    return _halves(codes, torch.empty(256, dtype=torch.int16)).float()


def _halves(q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """e4m3 bytes q (uint8) as float16 values times 2**-8, in w (int16, q's shape).

    torch's e4m3 -> fp16 cast is scalar code (~1.3 ns/element on CPU). The bits do it exactly
    with int16 ops: (b << 7) puts exponent and mantissa in place (the value times 2**-8,
    subnormals included) and adding bit 14 to itself carries the sign into bit 15; the 2**8
    goes into the scale."""
    w.copy_(q)
    w.bitwise_left_shift_(7)
    w.add_(w & 0x4000)
    return w.view(torch.float16)
