"""`kvtc`: transform coding of KV chunks with a per-model calibration (after NVIDIA's KVTC).

Per layer, each token's K and V are scaled per plane, centred and projected together onto the
calibration's principal components (kvtc_fit.py, kvtc_transform.py), quantized there with one
step for every component, `step = 2 ** (-quality / 2)` of the planes' RMS (each +1 of quality
halves the noise power, about +0.5 bit per coded component), and entropy coded with the rANS
coder (kvtc_model.py). Large outlier channels need no special case: the transform gives them
components of their own, coded to the same absolute step. Attention sinks (tokens whose V is
almost zero: they absorb attention, so an error in them shifts every output) are coded apart
in the channel space at 1/8 of the step (kvtc_sinks.py).

A blob names the calibration that decodes it (its id opens the params); decoding with any
other calibration, or none, is a MissingCalibrationError, never wrong KV.

    params    calibration id (16 bytes) | revision u8 | lanes u8 | step float32
    sections  side info (9 bits per coded component), raw low bits (grouped by width),
              sink token indices (u16), sink values, rANS final states (u32 per stream),
              then each lane's rANS words (u16)
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import torch

from lmc_connector.ops.allocator import Allocator
from lmc_connector.ops.codecs import bitpack
from lmc_connector.ops.codecs import format as fmt
from lmc_connector.ops.codecs import kvtc_model as model
from lmc_connector.ops.codecs import kvtc_sinks as sink
from lmc_connector.ops.codecs import kvtc_streams as streams
from lmc_connector.ops.codecs import kvtc_transform as transform
from lmc_connector.ops.codecs._tensors import all_finite, group_by, resolve_device
from lmc_connector.ops.codecs.calibration import (
    CALIBRATION_ID_BYTES,
    Calibration,
    parse_calibration,
)
from lmc_connector.ops.codecs.errors import CodecError, MissingCalibrationError
from lmc_connector.ops.codecs.registry import codec_id

CODEC_ID = codec_id("kvtc")
DEFAULT_QUALITY = 3.5
MAX_QUALITY = 16.0
_PARAMS = struct.Struct("<BBf")  # after the calibration id: revision, lanes, step
_REVISION = 1


class KvtcCodec:
    """A kvtc codec bound to one calibration and quality. Stateless beyond that: any thread
    may encode and decode (the calibration memoizes its per-device weights)."""

    name = "kvtc"

    def __init__(
        self, calibration: Calibration | bytes | None = None, quality: float = DEFAULT_QUALITY
    ) -> None:
        if calibration is None:
            raise MissingCalibrationError(None)
        cal = (
            calibration if isinstance(calibration, Calibration) else parse_calibration(calibration)
        )
        if cal.codec_id != CODEC_ID:
            raise CodecError(f"calibration {cal.id} is for codec id {cal.codec_id}, not kvtc")
        if not 0 <= quality <= MAX_QUALITY:
            raise ValueError(f"kvtc quality must be in [0, {MAX_QUALITY}], got {quality}")
        self.calibration = cal
        self.quality = float(quality)
        self.step = float(torch.tensor(2 ** (-quality / 2), dtype=torch.float32))

    def encode(self, kv: torch.Tensor) -> bytes:
        return self.encode_batch([kv])[0]

    def decode(
        self,
        blob: bytes | memoryview,
        device: torch.device | str | None = None,
        allocate: Allocator | None = None,
    ) -> torch.Tensor:
        return self.decode_batch([blob], device, allocate)[0]

    def encode_batch(self, kvs: Sequence[torch.Tensor]) -> list[bytes]:
        out: list[bytes] = [b""] * len(kvs)
        for kv in kvs:
            fmt.check_kv(kv)
            self._check_layout(tuple(kv.shape), ValueError)
        for idx in group_by(kvs, lambda kv: (tuple(kv.shape), kv.dtype, kv.device)):
            for i, blob in zip(idx, self._encode_same([kvs[i] for i in idx]), strict=True):
                out[i] = blob
        return out

    def decode_batch(
        self,
        blobs: Sequence[bytes | memoryview],
        device: torch.device | str | None = None,
        allocate: Allocator | None = None,
    ) -> list[torch.Tensor]:
        from lmc_connector.ops.codecs.registry import peek_header

        headers = [peek_header(b) for b in blobs]
        for h in headers:
            if h.codec != self.name:
                raise CodecError(f"blob holds codec {h.codec!r}, not {self.name!r}")
            if h.calibration_id != self.calibration.id:
                raise MissingCalibrationError(h.calibration_id)
            self._check_layout(h.shape, CodecError)
        dev = resolve_device(device)
        out: list[torch.Tensor] = [torch.empty(0)] * len(blobs)
        for idx in group_by(headers, lambda h: (h.shape, h.params, h.dtype)):
            parts = [(headers[i], blobs[i]) for i in idx]
            for i, t in zip(idx, self._decode_same(parts, dev, allocate), strict=True):
                out[i] = t
        return out

    def _check_layout(self, shape: tuple[int, ...], error: type[ValueError]) -> None:
        planes, layers, _tokens, channels = shape
        if (planes, layers, channels) != self.calibration.layout:
            p, n, c = self.calibration.layout
            raise error(
                f"kvtc calibration {self.calibration.id} fits [{p}, {n}, *, {c}] chunks, "
                f"not {list(shape)}: calibrate for this layout"
            )

    def _encode_same(self, kvs: list[torch.Tensor], sanitized: bool = False) -> list[bytes]:
        nb, (planes, layers, tokens, channels) = len(kvs), kvs[0].shape
        dev = kvs[0].device
        x = torch.stack(kvs) if nb > 1 else kvs[0].unsqueeze(0)
        if sanitized:
            big = torch.finfo(x.dtype).max
            x = torch.nan_to_num(x, nan=0.0, posinf=big, neginf=-big)
        w = transform.weights(self.calibration, dev, self.step)
        xj = torch.empty(layers, nb, tokens, planes, channels, dtype=torch.float32, device=dev)
        xj.copy_(x.permute(2, 0, 3, 1, 4))
        sinks = sink.find(xj[:, :, :, -1])
        xj = xj.view(layers, nb * tokens, planes * channels)
        c = transform.project(xj, w)
        rows = torch.cat([s + b * tokens for b, s in enumerate(sinks)]).to(dev)
        z = (xj[:, rows] - w.mean) / w.scale
        c[:, rows] = 0
        q = c.round_().view(layers, nb, tokens, w.width)
        k, side, finite = model.fit_components(q)
        if not sanitized and not (finite and all_finite(z)):
            return self._encode_same(kvs, sanitized=True)  # NaN or infinity in the input
        # The leading (widest) components alone can need a shift: split those only.
        wide = torch.nonzero((k > 0).any(0).any(0))
        shifted = int(wide.max()) + 1 if wide.numel() else 0
        top = q[..., :shifted].clamp_(1 - model.QMAX, model.QMAX - 1)
        unit = torch.exp2(k[..., :shifted]).unsqueeze(2)
        hi = torch.floor(top / unit)
        low = (top - hi * unit).view(layers, nb * tokens, shifted)
        top.copy_(hi)
        _, dist = model.unpack_side(side)
        q += (model.HALF + model.ALPHABET * dist).unsqueeze(2)
        lanes, coded = streams.encode_codes(
            streams.gather(q.view(layers, nb * tokens, w.width), w.active, nb, tokens, torch.int16)
        )
        narrow = [min(a, shifted) for a in w.active]
        low = streams.gather(low, narrow, nb, tokens, torch.int32)
        k_low = _by_component(k, narrow)
        side_c = _by_component(side, w.active)
        params = bytes.fromhex(self.calibration.id) + _PARAMS.pack(_REVISION, lanes, self.step)
        blobs, at = [], 0
        for b in range(nb):
            n = int(sinks[b].numel())
            sections = [
                bitpack.pack(side_c[b], model.SIDE_BITS),
                _raw_bits(low[b], k_low[b]),
                sinks[b].cpu().numpy().astype("<u2").tobytes(),
                sink.pack(z[:, at : at + n], self.step),
                *_lanes(coded[b * lanes : (b + 1) * lanes]),
            ]
            at += n
            blobs.append(fmt.pack(CODEC_ID, kvs[b].dtype, kvs[b].shape, params, sections))
        return blobs

    def _decode_same(
        self,
        parts: list[tuple[fmt.BlobHeader, bytes | memoryview]],
        dev: torch.device,
        allocate: Allocator | None,
    ) -> list[torch.Tensor]:
        header = parts[0][0]
        planes, layers, tokens, channels = header.shape
        nb = len(parts)
        revision, lanes, step = _PARAMS.unpack_from(header.params, CALIBRATION_ID_BYTES)
        if len(header.params) != CALIBRATION_ID_BYTES + _PARAMS.size or revision != _REVISION:
            raise CodecError(f"unsupported kvtc params (revision {revision})")
        if not (math.isfinite(step) and 2 ** (-MAX_QUALITY / 2) <= step <= 1.0):
            raise CodecError(f"kvtc step {step} out of range")
        w = transform.weights(self.calibration, dev, step)
        comps = sum(w.active)
        sections = [h.sections(blob) for h, blob in parts]
        sides, sinks, values = [], [], []
        for sec in sections:
            if len(sec) != 5 + lanes:
                raise CodecError(f"kvtc blob has {len(sec)} sections, expected {5 + lanes}")
            sides.append(_unbits(sec[0], comps, model.SIDE_BITS, dev, "side information"))
            sinks.append(_sink_rows(sec[2], tokens, dev))
            n = int(sinks[-1].numel())
            values.append(sink.unpack(sec[3], layers, n, planes * channels, step, dev))
        k, dist = model.unpack_side(torch.stack(sides))
        lows = [_unraw(sec[1], kb, tokens, dev) for sec, kb in zip(sections, k, strict=True)]
        q = streams.decode_codes([s[4:] for s in sections], dist, tokens, lanes).float()
        q -= model.HALF
        for b, (cols, low) in enumerate(lows):
            if cols.numel():
                q[b][:, cols] = q[b][:, cols] * torch.exp2(k[b, cols].float()) + low
        c = streams.scatter(q, w.active, w.width)
        xj = transform.reconstruct(c, w, _wide_rows(k, w, tokens).to(dev))
        rows = torch.cat([s + b * tokens for b, s in enumerate(sinks)])
        xj[:, rows] = torch.cat(values, 1) * w.scale + w.mean
        out = xj.view(layers, nb, tokens, planes, channels).permute(1, 3, 0, 2, 4)
        if allocate is None:
            return list(out.to(header.dtype).contiguous().unbind(0))
        return [allocate(header.shape, header.dtype).copy_(chunk) for chunk in out.unbind(0)]


def _wide_rows(k: torch.Tensor, w: transform.Weights, tokens: int) -> torch.Tensor:
    """Rows of the chunks whose late components may leave int8: q = hi * 2**k + low fits
    [-128, 127] while k <= 2."""
    wide = torch.nonzero(((k.cpu() > 2) & w.late).any(1)).flatten()
    return (wide[:, None] * tokens + torch.arange(tokens)).flatten()


def _by_component(t: torch.Tensor, active: Sequence[int]) -> torch.Tensor:
    """[chunks, components] of the coded components of t [layers, chunks, width]."""
    return torch.cat([t[layer, :, :a] for layer, a in enumerate(active)], -1)


def _unbits(buf: memoryview, count: int, width: int, dev: torch.device, what: str) -> torch.Tensor:
    if len(buf) != bitpack.packed_size(count, width):
        raise CodecError(f"kvtc {what} of {len(buf)} bytes, expected "
                         f"{bitpack.packed_size(count, width)}")  # fmt: skip
    return bitpack.unpack(buf, count, width, dev).to(torch.int32)


def _raw_bits(low: torch.Tensor, k: torch.Tensor) -> bytes:
    """The low bits of low [tokens, components]: per width (ascending), token by token, the
    components of that width k (in component order). `low` may hold only the leading
    components: the others have k = 0."""
    counts = torch.bincount(k.to(torch.int64), minlength=model.MAX_K + 1).tolist()
    return b"".join(
        bitpack.pack(low[:, k == width], width) for width in range(1, len(counts)) if counts[width]
    )


def _unraw(
    buf: memoryview, k: torch.Tensor, tokens: int, dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `_raw_bits`: the components with k > 0 (ascending) and their low bits
    [tokens, those components] (float32)."""
    cols = torch.nonzero(k > 0).flatten()
    widths = k[cols]
    counts = torch.bincount(widths.to(torch.int64), minlength=model.MAX_K + 1).tolist()
    sizes = [bitpack.packed_size(counts[w] * tokens, w) for w in range(len(counts))]
    if len(buf) != sum(sizes):
        raise CodecError(f"kvtc raw bits section of {len(buf)} bytes, expected {sum(sizes)}")
    low = torch.zeros(tokens, cols.numel(), dtype=torch.float32, device=dev)
    at = 0
    for width in range(1, len(counts)):
        if counts[width]:
            count = counts[width] * tokens
            vals = _unbits(buf[at : at + sizes[width]], count, width, dev, "raw bits")
            low[:, widths == width] = vals.view(tokens, -1).float()
            at += sizes[width]
    return cols, low


def _sink_rows(buf: memoryview, tokens: int, dev: torch.device) -> torch.Tensor:
    if len(buf) % 2 or len(buf) // 2 > sink.MAX_SINKS:
        raise CodecError(f"kvtc sink section of {len(buf)} bytes")
    idx = torch.tensor(struct.unpack(f"<{len(buf) // 2}H", buf), dtype=torch.int64)
    if idx.numel() and (int(idx[-1]) >= tokens or bool((idx[1:] <= idx[:-1]).any())):
        raise CodecError("kvtc sink indices out of order or out of range")
    return idx.to(dev)


def _lanes(coded: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [b"".join(states for _, states in coded), *(words for words, _ in coded)]
