"""On-disk form of one chunk: a fixed header, the payload, a CRC32 of both.

Plain chunks store the raw tensor bytes; encoded chunks store the codec blob
as is. Nothing here is ever unpickled: the header is a fixed struct.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from lmc_connector.cache.chunk import Chunk
from lmc_connector.cache.layout import DTYPES, dtype_name

MAGIC = b"LMCD"
VERSION = 1
# magic, version, encoded flag, name (dtype or method), num_tokens, shape, payload length, crc32
_HEADER = struct.Struct("<4sHB16sI4IQI")
HEADER_SIZE = _HEADER.size


class DiskFormatError(ValueError):
    """The file is not a valid chunk file; drop it and recompute."""


@dataclass(frozen=True, slots=True)
class DiskRecord:
    """What the disk index keeps per chunk: no data, just enough to account and report."""

    nbytes: int
    num_tokens: int
    method: str | None


def _payload(chunk: Chunk) -> tuple[memoryview | bytes, bytes, tuple[int, int, int, int]]:
    if chunk.blob is not None:
        assert chunk.method is not None
        return chunk.blob, chunk.method.encode(), (0, 0, 0, 0)
    assert chunk.kv is not None
    kv = chunk.kv.contiguous()
    shape = tuple(kv.shape)
    assert len(shape) == 4
    data = memoryview(kv.view(torch.uint8).numpy().data).cast("B")
    return data, dtype_name(kv.dtype).encode(), (shape[0], shape[1], shape[2], shape[3])


def write_chunk(path: Path, chunk: Chunk) -> DiskRecord:
    """Write a chunk file at `path` (callers write a temporary name and rename it)."""
    data, name, shape = _payload(chunk)
    header_fields = (MAGIC, VERSION, int(chunk.encoded), name, chunk.num_tokens, *shape, len(data))
    crc = zlib.crc32(data, zlib.crc32(struct.pack("<4sHB16sI4IQ", *header_fields)))
    with open(path, "wb") as f:
        f.write(_HEADER.pack(*header_fields, crc))
        f.write(data)
    return DiskRecord(HEADER_SIZE + len(data), chunk.num_tokens, chunk.method)


def _parse_header(raw: bytes, path: Path) -> tuple[tuple[object, ...], int]:
    if len(raw) < HEADER_SIZE:
        raise DiskFormatError(f"{path}: truncated header")
    fields = _HEADER.unpack(raw[:HEADER_SIZE])
    if fields[0] != MAGIC or fields[1] != VERSION:
        raise DiskFormatError(f"{path}: not a chunk file of format version {VERSION}")
    return fields, int(fields[-1])


def read_record(path: Path) -> DiskRecord:
    """Read only the header: enough to re-admit a file after a restart."""
    with open(path, "rb") as f:
        fields, _ = _parse_header(f.read(HEADER_SIZE), path)
    encoded, name, num_tokens, payload_len = fields[2], fields[3], fields[4], fields[9]
    assert isinstance(name, bytes) and isinstance(payload_len, int) and isinstance(num_tokens, int)
    if path.stat().st_size != HEADER_SIZE + payload_len:
        raise DiskFormatError(f"{path}: size does not match its header")
    method = name.rstrip(b"\0").decode() if encoded else None
    return DiskRecord(HEADER_SIZE + payload_len, num_tokens, method)


def read_chunk(path: Path) -> Chunk:
    """Read and verify a chunk file; raise DiskFormatError on any mismatch."""
    raw = bytearray(path.read_bytes())
    fields, crc = _parse_header(bytes(raw[:HEADER_SIZE]), path)
    _, _, encoded, name, num_tokens, s0, s1, s2, s3, payload_len, _ = fields
    assert isinstance(name, bytes) and isinstance(payload_len, int) and isinstance(num_tokens, int)
    payload = memoryview(raw)[HEADER_SIZE:]
    if len(payload) != payload_len:
        raise DiskFormatError(f"{path}: payload is {len(payload)} bytes, header says {payload_len}")
    expected = zlib.crc32(payload, zlib.crc32(bytes(raw[: HEADER_SIZE - 4])))
    if expected != crc:
        raise DiskFormatError(f"{path}: checksum mismatch (file corrupted)")
    text = name.rstrip(b"\0").decode(errors="replace")
    if encoded:
        return Chunk(num_tokens, blob=bytes(payload), method=text)
    if text not in DTYPES:
        raise DiskFormatError(f"{path}: unknown dtype {text!r}")
    dtype = DTYPES[text]
    shape = (int(s0), int(s1), int(s2), int(s3))  # type: ignore[call-overload]
    kv = torch.frombuffer(raw, dtype=torch.uint8, offset=HEADER_SIZE, count=payload_len)
    if kv.numel() != shape[0] * shape[1] * shape[2] * shape[3] * dtype.itemsize:
        raise DiskFormatError(f"{path}: shape {shape} does not match the payload size")
    return Chunk(num_tokens, kv=kv.view(dtype).view(shape))
