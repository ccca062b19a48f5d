"""Calibrations: per-model statistics a codec fits once and then needs to encode and decode.

A calibration is one checked, self-describing byte string, named by its content hash (the
calibration id, 32 hex digits). Every blob a calibrated codec writes carries that id as the
first CALIBRATION_ID_BYTES bytes of its params (see registry.peek_header), so whoever holds a
blob can tell which calibration decodes it without decoding anything.

    header    "<4sBBBxHHI": magic, version, codec id, planes, layers, channels, fitted tokens
    ranks     layers x u16: the components each layer keeps
    scale     float32 [layers, planes]: the RMS each plane is divided by before the transform
    mean      float32 [layers, planes * channels]
    variance  float32 [sum(ranks)]: each component's variance (descending within a layer)
    basis     float16 [sum(ranks), planes * channels]: each layer's components, as rows
    crc32     u32 over everything before it

`parse_calibration` checks the framing, every size against the header and the values it can
check cheaply before it builds a tensor. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from lmc_connector.checksum import crc32
from lmc_connector.ops.codecs.errors import CodecError

MAGIC = b"LMCC"
VERSION = 1
CALIBRATION_ID_BYTES = 16
MAX_LAYERS = 1024
MAX_DIMS = 1 << 15
_HEAD = struct.Struct("<4sBBBxHHI")
_CRC = struct.Struct("<I")
T = TypeVar("T")


@dataclass(frozen=True, eq=False)
class Calibration:
    """A parsed calibration: immutable statistics plus a per-process memo of what codecs
    derive from them (device copies, weights for a quality setting), filled on first use by
    any thread."""

    id: str
    codec_id: int
    planes: int
    layers: int
    channels: int
    fitted_tokens: int
    ranks: tuple[int, ...]
    scale: torch.Tensor  # [layers, planes]
    mean: torch.Tensor  # [layers, planes * channels]
    variance: tuple[torch.Tensor, ...]  # per layer [rank]
    basis: tuple[torch.Tensor, ...]  # per layer [rank, planes * channels], float32
    blob: bytes = field(repr=False)
    _memo: dict[Any, Any] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def layout(self) -> tuple[int, int, int]:
        """(planes, layers, channels): the chunk shape it fits, tokens aside."""
        return (self.planes, self.layers, self.channels)

    def memo(self, key: Any, build: Callable[[], T]) -> T:
        """`build()` once per key for the life of this object."""
        with self._lock:
            if key not in self._memo:
                self._memo[key] = build()
            value: T = self._memo[key]
            return value


def calibration_id(blob: bytes | bytearray | memoryview) -> str:
    """The content hash naming a calibration (32 hex digits), after checking its framing."""
    _check_framing(memoryview(blob))
    return _digest(blob).hex()


def serialize(
    codec_id: int,
    layout: tuple[int, int, int],
    fitted_tokens: int,
    scale: torch.Tensor,
    mean: torch.Tensor,
    variance: list[torch.Tensor],
    basis: list[torch.Tensor],
) -> bytes:
    """The calibration blob of these statistics (tensors on any device, any float dtype)."""
    planes, layers, channels = layout
    ranks = [int(v.numel()) for v in variance]
    head = _HEAD.pack(MAGIC, VERSION, codec_id, planes, layers, channels, fitted_tokens)
    body = b"".join(
        [
            head,
            struct.pack(f"<{layers}H", *ranks),
            _le(scale, np.float32),
            _le(mean, np.float32),
            *(_le(v, np.float32) for v in variance),
            *(_le(b, np.float16) for b in basis),
        ]
    )
    return body + _CRC.pack(crc32(body))


def parse_calibration(blob: bytes | bytearray | memoryview) -> Calibration:
    """Validate and load a calibration blob; CodecError says what is wrong."""
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise CodecError(f"a calibration is bytes, got {type(blob).__name__}")
    view = memoryview(blob)
    codec_id, planes, layers, channels, fitted, ranks = _check_framing(view)
    dims = planes * channels
    at = _HEAD.size + 2 * layers
    scale, at = _floats(view, at, np.float32, layers * planes)
    mean, at = _floats(view, at, np.float32, layers * dims)
    variance, basis = [], []
    for r in ranks:
        v, at = _floats(view, at, np.float32, r)
        variance.append(v)
    for r in ranks:
        b, at = _floats(view, at, np.float16, r * dims)
        basis.append(b.view(r, dims))
    if not bool((scale > 0).all()) or not all(bool((v >= 0).all()) for v in variance):
        raise CodecError("calibration has a non-positive scale or a negative variance")
    for b in basis:
        norms = b.square().sum(1)
        if not bool(((norms - 1).abs() < 0.01).all()):
            raise CodecError("calibration basis rows are not unit vectors")
    return Calibration(
        id=_digest(view).hex(),
        codec_id=codec_id,
        planes=planes,
        layers=layers,
        channels=channels,
        fitted_tokens=fitted,
        ranks=ranks,
        scale=scale.view(layers, planes),
        mean=mean.view(layers, dims),
        variance=tuple(variance),
        basis=tuple(basis),
        blob=bytes(view),
    )


def _check_framing(view: memoryview) -> tuple[int, int, int, int, int, tuple[int, ...]]:
    size = len(view)
    if size < _HEAD.size + _CRC.size:
        raise CodecError(f"calibration of {size} bytes is shorter than its header")
    magic, version, codec_id, planes, layers, channels, fitted = _HEAD.unpack_from(view)
    if magic != MAGIC:
        raise CodecError(f"bad magic {bytes(magic)!r}: not a calibration")
    if version != VERSION:
        raise CodecError(f"unsupported calibration version {version} (this build reads {VERSION})")
    dims = planes * channels
    if planes not in (1, 2) or not 1 <= layers <= MAX_LAYERS or not 1 <= dims <= MAX_DIMS:
        raise CodecError(f"invalid calibration layout: {planes} planes, {layers} layers, "
                         f"{channels} channels")  # fmt: skip
    if size < _HEAD.size + 2 * layers + _CRC.size:
        raise CodecError(f"truncated calibration: {size} bytes")
    ranks = struct.unpack_from(f"<{layers}H", view, _HEAD.size)
    if any(not 1 <= r <= dims for r in ranks):
        raise CodecError(f"invalid calibration ranks {list(ranks)} for {dims} dimensions")
    rank_sum = sum(ranks)
    want = _HEAD.size + 2 * layers + 4 * (layers * planes + layers * dims + rank_sum)
    want += 2 * rank_sum * dims + _CRC.size
    if size != want:
        raise CodecError(f"calibration is {size} bytes but its header describes {want}")
    (crc,) = _CRC.unpack_from(view, size - _CRC.size)
    if crc32(view[: size - _CRC.size]) != crc:
        raise CodecError("calibration checksum mismatch: the blob is corrupted")
    return codec_id, planes, layers, channels, fitted, ranks


def _floats(view: memoryview, at: int, dtype: type, count: int) -> tuple[torch.Tensor, int]:
    width = np.dtype(dtype).itemsize
    raw = np.frombuffer(view, dtype=np.dtype(dtype).newbyteorder("<"), count=count, offset=at)
    t = torch.from_numpy(raw.astype(np.float32))
    if not bool(torch.isfinite(t).all()):
        raise CodecError("calibration holds non-finite values")
    return t, at + width * count


def _le(t: torch.Tensor, dtype: type) -> bytes:
    a = t.detach().to("cpu", torch.float64).numpy().astype(np.dtype(dtype).newbyteorder("<"))
    return a.tobytes()


def _digest(blob: bytes | bytearray | memoryview) -> bytes:
    return hashlib.blake2b(blob, digest_size=CALIBRATION_ID_BYTES).digest()
