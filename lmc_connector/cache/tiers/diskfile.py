"""On-disk form of one chunk: a chunk record (`cache/record.py`) in a file of its own."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

from lmc_connector.cache.chunk import Chunk
from lmc_connector.cache.record import (
    HEADER_SIZE,
    RecordFormatError,
    pack_header,
    parse_header,
    payload,
)

__all__ = ["HEADER_SIZE", "DiskFormatError", "DiskRecord", "read_chunk", "read_record"]


class DiskFormatError(RecordFormatError):
    """The file is not a valid chunk file; drop it and recompute."""


@dataclass(frozen=True, slots=True)
class DiskRecord:
    """What the disk index keeps per chunk: no data, just enough to account and report."""

    nbytes: int
    num_tokens: int
    method: str | None


def write_chunk(path: Path, chunk: Chunk) -> DiskRecord:
    """Write a chunk file at `path` (callers write a temporary name and rename it)."""
    data = payload(chunk)
    with open(path, "wb") as f:
        f.write(pack_header(chunk, data))
        f.write(data)
    return DiskRecord(HEADER_SIZE + data.nbytes, chunk.num_tokens, chunk.method)


def read_record(path: Path) -> DiskRecord:
    """Read only the header: enough to re-admit a file after a restart."""
    with open(path, "rb") as f:
        header = parse_header(f.read(HEADER_SIZE), str(path))
    if path.stat().st_size != HEADER_SIZE + header.payload_len:
        raise DiskFormatError(f"{path}: size does not match its header")
    return DiskRecord(HEADER_SIZE + header.payload_len, header.num_tokens, header.method)


def read_chunk(path: Path) -> Chunk:
    """Read and verify a chunk file; raise a RecordFormatError on any mismatch."""
    raw = bytearray(path.read_bytes())
    header = parse_header(raw, str(path))
    header.verify(zlib.crc32(memoryview(raw)[HEADER_SIZE:], header.crc_start))
    return header.chunk(raw, HEADER_SIZE)
