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

    def decode(self, blob: bytes, device: torch.device | str | None = None) -> torch.Tensor:
        return self.decode_batch([blob], device)[0]

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
        self, blobs: Sequence[bytes], device: torch.device | str | None = None
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
            for i, t in zip(idx, self._decode_same(parts, dev), strict=True):
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

    def _encode_same(self, kvs: list[torch.Tensor]) -> list[bytes]:
        nb, (planes, layers, tokens, channels) = len(kvs), kvs[0].shape
        dev = kvs[0].device
        x = torch.stack(kvs) if nb > 1 else kvs[0].unsqueeze(0)
        if not all_finite(x):
            big = torch.finfo(x.dtype).max
            x = torch.nan_to_num(x, nan=0.0, posinf=big, neginf=-big)
        w = transform.weights(self.calibration, dev, self.step)
        xj = torch.empty(layers, nb, tokens, planes, channels, dtype=torch.float32, device=dev)
        xj.copy_(x.permute(2, 0, 3, 1, 4))
        xj = xj.view(layers, nb * tokens, planes * channels)
        c = transform.project(xj, w)
        sinks = sink.find(x)
        rows = torch.cat([s + b * tokens for b, s in enumerate(sinks)]).to(dev)
        z = (xj[:, rows] - w.mean) / w.scale
        c[:, rows] = 0
        q = c.round_().clamp_(1 - model.QMAX, model.QMAX - 1).view(layers, nb, tokens, w.width)
        k, side = model.fit_components(q)
        unit = torch.exp2(k).unsqueeze(2)
        hi = torch.floor(q / unit)
        q -= hi * unit  # now the low bits
        _, dist = model.unpack_side(side)
        hi += (model.HALF + model.ALPHABET * dist).unsqueeze(2)
        flat = (layers, nb * tokens, w.width)
        lanes, coded = streams.encode_codes(
            streams.gather(hi.view(flat), w.active, nb, tokens, torch.int16)
        )
        low = streams.gather(q.view(flat), w.active, nb, tokens, torch.int32)
        side_c = _by_component(side, w.active)
        k_c = _by_component(k, w.active)
        params = bytes.fromhex(self.calibration.id) + _PARAMS.pack(_REVISION, lanes, self.step)
        blobs, at = [], 0
        for b in range(nb):
            n = int(sinks[b].numel())
            sections = [
                _bits(side_c[b], model.SIDE_BITS),
                _raw_bits(low[b], k_c[b]),
                sinks[b].cpu().numpy().astype("<u2").tobytes(),
                sink.pack(z[:, at : at + n], self.step),
                *_lanes(coded[b * lanes : (b + 1) * lanes]),
            ]
            at += n
            blobs.append(fmt.pack(CODEC_ID, kvs[b].dtype, kvs[b].shape, params, sections))
        return blobs

    def _decode_same(
        self, parts: list[tuple[fmt.BlobHeader, bytes]], dev: torch.device
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
        low = torch.stack(
            [_unraw(sec[1], kb, tokens, dev) for sec, kb in zip(sections, k, strict=True)]
        )
        syms = streams.decode_codes([s[4:] for s in sections], dist, tokens, lanes)
        q = (syms - model.HALF).mul_((1 << k).unsqueeze(1)).add_(low).float()
        c = streams.scatter(q, w.active, w.width)
        xj = transform.reconstruct(c, w)
        rows = torch.cat([s + b * tokens for b, s in enumerate(sinks)])
        xj[:, rows] = torch.cat(values, 1) * w.scale + w.mean
        out = xj.view(layers, nb, tokens, planes, channels).permute(1, 3, 0, 2, 4)
        return list(out.to(header.dtype).contiguous().unbind(0))


def _by_component(t: torch.Tensor, active: tuple[int, ...]) -> torch.Tensor:
    """[chunks, components] of the coded components of t [layers, chunks, width]."""
    return torch.cat([t[layer, :, :a] for layer, a in enumerate(active)], -1)


def _bits(values: torch.Tensor, width: int) -> bytes:
    return bitpack.pack(values.reshape(-1).long(), width).cpu().numpy().tobytes()


def _unbits(buf: memoryview, count: int, width: int, dev: torch.device, what: str) -> torch.Tensor:
    if len(buf) != bitpack.packed_size(count, width):
        raise CodecError(f"kvtc {what} of {len(buf)} bytes, expected "
                         f"{bitpack.packed_size(count, width)}")  # fmt: skip
    data = (
        torch.frombuffer(bytearray(buf), dtype=torch.uint8)
        if len(buf)
        else torch.empty(0, dtype=torch.uint8)
    )
    return bitpack.unpack(data.to(dev), count, width).to(torch.int32)


def _raw_bits(low: torch.Tensor, k: torch.Tensor) -> bytes:
    """The low bits of low [tokens, components]: per width (ascending), token by token, the
    components of that width k."""
    widths = sorted(set(k.unique().int().tolist()) - {0})
    return b"".join(_bits(low[:, k == width], width) for width in widths)


def _unraw(buf: memoryview, k: torch.Tensor, tokens: int, dev: torch.device) -> torch.Tensor:
    """Inverse of `_raw_bits`: [tokens, components] int32."""
    low = torch.zeros(tokens, k.numel(), dtype=torch.int32, device=dev)
    counts = [int((k == width).sum()) for width in range(model.MAX_K + 1)]
    want = sum(bitpack.packed_size(counts[w] * tokens, w) for w in range(1, model.MAX_K + 1))
    if len(buf) != want:
        raise CodecError(f"kvtc raw bits section of {len(buf)} bytes, expected {want}")
    at = 0
    for width in range(1, model.MAX_K + 1):
        if not counts[width]:
            continue
        size = bitpack.packed_size(counts[width] * tokens, width)
        vals = _unbits(buf[at : at + size], counts[width] * tokens, width, dev, "raw bits")
        low[:, k == width] = vals.view(tokens, -1)
        at += size
    return low


def _sink_rows(buf: memoryview, tokens: int, dev: torch.device) -> torch.Tensor:
    if len(buf) % 2 or len(buf) // 2 > sink.MAX_SINKS:
        raise CodecError(f"kvtc sink section of {len(buf)} bytes")
    idx = torch.tensor(struct.unpack(f"<{len(buf) // 2}H", buf), dtype=torch.int64)
    if idx.numel() and (int(idx[-1]) >= tokens or bool((idx[1:] <= idx[:-1]).any())):
        raise CodecError("kvtc sink indices out of order or out of range")
    return idx.to(dev)


def _lanes(coded: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [b"".join(states for _, states in coded), *(words for words, _ in coded)]
