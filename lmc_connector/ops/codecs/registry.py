"""Codec names -> implementations, imported lazily on first use.

Each codec has a name (what `method` says), an id (the byte its blobs carry in their header:
part of the byte format, so an id is never given to another codec, even after the first is
removed) and a factory "module:attribute". A calibrated codec also has a calibrator
"module:function" that fits its calibration from sample chunks; its blobs carry the
calibration id as the first CALIBRATION_ID_BYTES bytes of their params, which `peek_header`
reads, and `decode_blob` looks that id up in the calibrations it is given.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import re
import threading
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from lmc_connector.ops.allocator import Allocator
from lmc_connector.ops.codecs import format as fmt
from lmc_connector.ops.codecs.calibration import CALIBRATION_ID_BYTES
from lmc_connector.ops.codecs.calibration_store import CalibrationSource, resolve
from lmc_connector.ops.codecs.errors import CodecError, MissingCalibrationError, UnknownCodecError


@runtime_checkable
class Codec(Protocol):
    """Encodes one KV chunk [2 or 1, layers, tokens, channels] to self-describing bytes."""

    name: str

    def encode(self, kv: torch.Tensor) -> bytes: ...

    def decode(
        self,
        blob: bytes | memoryview,
        device: torch.device | str | None = None,
        allocate: Allocator | None = None,
    ) -> torch.Tensor: ...

    def encode_batch(self, kvs: Sequence[torch.Tensor]) -> list[bytes]: ...

    def decode_batch(
        self,
        blobs: Sequence[bytes | memoryview],
        device: torch.device | str | None = None,
        allocate: Allocator | None = None,
    ) -> list[torch.Tensor]:
        """The chunks of `blobs`, on `device`; each decoded chunk's memory from `allocate`
        (a tensor on `device`) where given, so that a caller can hand out memory it reuses."""
        ...


@dataclasses.dataclass(frozen=True)
class _Entry:
    codec_id: int
    factory: str
    calibrator: str | None


_lock = threading.Lock()
_REGISTRY: dict[str, _Entry] = {}
#: id -> name, for every id ever registered in this process (removed ones stay here).
_IDS_EVER: dict[int, str] = {}
#: id -> name of the codecs registered now (read by the blob parser).
CODEC_IDS: dict[int, str] = {}
_TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def register(name: str, codec_id: int, factory: str, *, calibrator: str | None = None) -> None:
    """Register codec `name` with its byte-format id (1-255) and factory "module:attribute"
    (called with get_codec's params). `calibrator` ("module:function", called with the sample
    chunks and options) makes it a calibrated codec. A name or id already in use, or an id
    that another name used before, is a ValueError."""
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"codec name {name!r} must be lower-case letters, digits and _")
    if not isinstance(codec_id, int) or not 1 <= codec_id <= 255:
        raise ValueError(f"codec id {codec_id!r} must be an integer in [1, 255]")
    for target in (factory, calibrator):
        if target is not None and not _TARGET.match(target):
            raise ValueError(f"{target!r} is not a 'module:attribute' target")
    with _lock:
        if name in _REGISTRY:
            raise ValueError(
                f"codec {name!r} is already registered (id {_REGISTRY[name].codec_id})"
            )
        if _IDS_EVER.get(codec_id, name) != name:
            raise ValueError(
                f"codec id {codec_id} is taken by {_IDS_EVER[codec_id]!r}: ids are part of the "
                "byte format and never reused; pick an unused id"
            )
        _REGISTRY[name] = _Entry(codec_id, factory, calibrator)
        _IDS_EVER[codec_id] = name
        CODEC_IDS[codec_id] = name


def unregister(name: str) -> None:
    """Remove codec `name` (blobs of its id no longer decode); its id stays reserved for it."""
    with _lock:
        entry = _REGISTRY.pop(name, None)
        if entry is None:
            raise UnknownCodecError(f"codec {name!r} is not registered")
        CODEC_IDS.pop(entry.codec_id, None)


def codec_id(name: str) -> int:
    """The id `name` writes into its blobs' headers."""
    return _entry(name).codec_id


def codec_names() -> list[str]:
    return sorted(_REGISTRY)


def is_calibrated(name: str) -> bool:
    """Whether codec `name` needs a calibration (see fit_calibration)."""
    return _entry(name).calibrator is not None


def get_codec(name: str, **params: Any) -> Codec:
    """A codec by registered name; `params` go to its factory (e.g. levels for cachegen,
    calibration and quality for kvtc)."""
    module_name, factory = _entry(name).factory.split(":")
    codec: Codec = getattr(importlib.import_module(module_name), factory)(**params)
    return codec


def fit_calibration(name: str, samples: Sequence[torch.Tensor], **options: Any) -> bytes:
    """Fit codec `name`'s calibration from sample chunks [planes, layers, tokens, channels]
    (e.g. chunks the cache holds): a self-describing, checksummed blob whose id is
    calibration_id(blob). Pass it as get_codec(name, calibration=blob)."""
    calibrator = _entry(name).calibrator
    if calibrator is None:
        raise ValueError(f"codec {name!r} takes no calibration")
    module_name, function = calibrator.split(":")
    blob: bytes = getattr(importlib.import_module(module_name), function)(samples, **options)
    return blob


def peek_header(blob: bytes | bytearray | memoryview) -> fmt.BlobHeader:
    """The validated header of `blob` (codec, dtype, shape, section sizes and, for calibrated
    codecs, the calibration id it needs), payload untouched."""
    header = fmt.parse(blob, CODEC_IDS)
    entry = _REGISTRY.get(header.codec)
    if entry is None or entry.calibrator is None:
        return header
    if len(header.params) < CALIBRATION_ID_BYTES:
        raise CodecError(f"{header.codec} blob has no calibration id in its params")
    return dataclasses.replace(header, calibration_id=header.params[:CALIBRATION_ID_BYTES].hex())


def decode_blob(
    blob: bytes | memoryview,
    device: torch.device | str | None = None,
    calibrations: CalibrationSource | None = None,
    allocate: Allocator | None = None,
) -> torch.Tensor:
    """Decode a blob of any registered codec, chosen by the codec id in its header. A blob of
    a calibrated codec is decoded with the calibration its header names, looked up in
    `calibrations` (a CalibrationStore or a dict id -> blob); none there is a
    MissingCalibrationError. `allocate`: as for `Codec.decode_batch`."""
    header = peek_header(blob)
    if header.calibration_id is None:
        return get_codec(header.codec).decode(blob, device, allocate)
    found = calibrations.get(header.calibration_id) if calibrations is not None else None
    if found is None:
        raise MissingCalibrationError(header.calibration_id)
    calibration = resolve(found, header.calibration_id)
    return get_codec(header.codec, calibration=calibration).decode(blob, device, allocate)


def _entry(name: str) -> _Entry:
    entry = _REGISTRY.get(name)
    if entry is None:
        names = codec_names()
        hint = difflib.get_close_matches(str(name), names, n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise UnknownCodecError(
            f"unknown compression method {name!r}; registered methods: "
            f"{', '.join(names)}{did_you_mean}"
        )
    return entry


register("fp8", 1, "lmc_connector.ops.codecs.fp8:Fp8Codec")
register("cachegen", 2, "lmc_connector.ops.codecs.cachegen:CacheGenCodec")
register(
    "kvtc", 3, "lmc_connector.ops.codecs.kvtc:KvtcCodec",
    calibrator="lmc_connector.ops.codecs.kvtc_fit:fit",
)  # fmt: skip
