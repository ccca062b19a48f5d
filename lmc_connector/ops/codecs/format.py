"""The one byte format every codec writes.

    header   "<4sBBBB4IHH": magic, version, codec id, dtype code, rank, shape (4 x u32),
             params length, section count
    params   codec-specific bytes (parsed by the codec)
    lengths  section count x u32
    sections the payload sections, back to back
    crc32    u32 over everything before it

`parse` checks all of it (sizes against the blob length, shape bounds, checksum) before a
codec allocates anything; codecs then check the section lengths against the shape.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmc_connector.checksum import crc32
from lmc_connector.ops.codecs.errors import CodecError

MAGIC = b"LMCK"
VERSION = 1
MAX_ELEMENTS = 1 << 31
MAX_SECTIONS = 16
MAX_PARAMS = 1024

_HEAD = struct.Struct("<4sBBBB4IHH")
_CRC = struct.Struct("<I")

DTYPE_CODES: dict[torch.dtype, int] = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}
_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


@dataclass(frozen=True, slots=True)
class BlobHeader:
    """What a blob says about itself; read without decoding the payload."""

    codec: str
    codec_id: int
    version: int
    dtype: torch.dtype
    shape: tuple[int, int, int, int]
    params: bytes
    section_sizes: tuple[int, ...]
    payload_offset: int
    total_size: int
    calibration_id: str | None = None  # set by registry.peek_header for calibrated codecs

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def sections(self, blob: bytes | memoryview) -> list[memoryview]:
        view = memoryview(blob)
        out, pos = [], self.payload_offset
        for size in self.section_sizes:
            out.append(view[pos : pos + size])
            pos += size
        return out


def check_kv(kv: torch.Tensor) -> None:
    """Reject anything but one chunk [1 or 2, layers, tokens, channels] of fp16/bf16/fp32."""
    if not isinstance(kv, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(kv).__name__}")
    if kv.dim() != 4 or kv.shape[0] not in (1, 2):
        raise ValueError(
            f"expected a KV chunk shaped [2 (K,V) or 1 (MLA), layers, tokens, channels], "
            f"got shape {tuple(kv.shape)}"
        )
    if kv.dtype not in DTYPE_CODES:
        raise ValueError(f"unsupported dtype {kv.dtype}; supported: float16, bfloat16, float32")
    if kv.numel() == 0:
        raise ValueError(f"empty KV chunk of shape {tuple(kv.shape)}")
    if kv.numel() >= MAX_ELEMENTS:
        raise ValueError(f"KV chunk of {kv.numel()} elements exceeds the {MAX_ELEMENTS} limit")


def pack(
    codec_id: int,
    dtype: torch.dtype,
    shape: Sequence[int],
    params: bytes,
    sections: Sequence[bytes | bytearray | memoryview],
) -> bytes:
    head = _HEAD.pack(
        MAGIC, VERSION, codec_id, DTYPE_CODES[dtype], 4, *shape, len(params), len(sections)
    )
    lengths = struct.pack(f"<{len(sections)}I", *(len(s) for s in sections))
    body = b"".join([head, params, lengths, *sections])
    return body + _CRC.pack(crc32(body))


def reseal(blob: bytes) -> bytes:
    """`blob` with its checksum recomputed (for tests that probe validation past the crc)."""
    return blob[: -_CRC.size] + _CRC.pack(crc32(blob[: -_CRC.size]))


def parse(blob: bytes | bytearray | memoryview, codec_names: dict[int, str]) -> BlobHeader:
    """Validate the framing of `blob`; raise CodecError saying what is wrong."""
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise CodecError(f"expected bytes, got {type(blob).__name__}")
    view = memoryview(blob)
    size = len(view)
    if size < _HEAD.size + _CRC.size:
        raise CodecError(f"blob of {size} bytes is shorter than the {_HEAD.size}-byte header")
    magic, version, codec_id, dtype_code, rank, *dims, n_params, n_sections = _HEAD.unpack_from(
        view
    )
    if magic != MAGIC:
        raise CodecError(f"bad magic {bytes(magic)!r}; not a codec blob")
    if version != VERSION:
        raise CodecError(f"unsupported format version {version} (this build reads {VERSION})")
    if codec_id not in codec_names:
        raise CodecError(f"unknown codec id {codec_id}")
    if dtype_code not in _DTYPES:
        raise CodecError(f"unknown dtype code {dtype_code}")
    if rank != 4 or dims[0] not in (1, 2) or min(dims) < 1:
        raise CodecError(f"invalid shape {tuple(dims)} (rank {rank})")
    numel = dims[0] * dims[1] * dims[2] * dims[3]
    if numel >= MAX_ELEMENTS:
        raise CodecError(f"shape {tuple(dims)} has {numel} elements, over the limit")
    if n_params > MAX_PARAMS or n_sections > MAX_SECTIONS:
        raise CodecError(f"implausible header: {n_params} param bytes, {n_sections} sections")
    lengths_at = _HEAD.size + n_params
    payload_at = lengths_at + 4 * n_sections
    if payload_at + _CRC.size > size:
        raise CodecError(f"truncated blob: {size} bytes, header alone needs {payload_at + 4}")
    sizes = struct.unpack_from(f"<{n_sections}I", view, lengths_at)
    if payload_at + sum(sizes) + _CRC.size != size:
        raise CodecError(
            f"blob is {size} bytes but its header describes {payload_at + sum(sizes) + 4} "
            "(truncated or padded)"
        )
    (crc,) = _CRC.unpack_from(view, size - _CRC.size)
    if crc32(view[: size - _CRC.size]) != crc:
        raise CodecError("checksum mismatch: the blob is corrupted")
    return BlobHeader(
        codec=codec_names[codec_id],
        codec_id=codec_id,
        version=version,
        dtype=_DTYPES[dtype_code],
        shape=(dims[0], dims[1], dims[2], dims[3]),
        params=bytes(view[_HEAD.size : lengths_at]),
        section_sizes=tuple(sizes),
        payload_offset=payload_at,
        total_size=size,
    )


def expect_sections(header: BlobHeader, expected: Sequence[int | None]) -> None:
    """Check the section count and every fixed size (None: any size)."""
    got = header.section_sizes
    if len(got) != len(expected) or any(
        e is not None and g != e for g, e in zip(got, expected, strict=True)
    ):
        raise CodecError(
            f"{header.codec} blob of shape {header.shape} has sections {list(got)}, "
            f"expected {['*' if e is None else e for e in expected]}"
        )
