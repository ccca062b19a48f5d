"""`fp8`: e4m3 values with one fp32 scale per (K/V, layer, token); about 2x smaller than fp16."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmc_connector.ops.codecs import format as fmt
from lmc_connector.ops.codecs._tensors import from_bytes, resolve_device, to_bytes
from lmc_connector.ops.codecs.errors import CodecError

CODEC_ID = 1
# A little under e4m3's max (448) so the rounded product never overflows to NaN.
_TARGET = 440.0
_PARAMS = b"\x00"  # scale mode 0: per (K/V, layer, token)


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

    def decode(self, blob: bytes, device: torch.device | str | None = None) -> torch.Tensor:
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
        q = from_bytes(value_buf, torch.float8_e4m3fn, header.numel, dev).view(header.shape)
        work = torch.float16 if header.dtype == torch.float16 else torch.float32
        out = q.to(work) * scale.view(e, layers, tokens, 1).to(work)
        return out.to(header.dtype)

    def encode_batch(self, kvs: Sequence[torch.Tensor]) -> list[bytes]:
        return [self.encode(kv) for kv in kvs]

    def decode_batch(
        self, blobs: Sequence[bytes], device: torch.device | str | None = None
    ) -> list[torch.Tensor]:
        return [self.decode(b, device) for b in blobs]
