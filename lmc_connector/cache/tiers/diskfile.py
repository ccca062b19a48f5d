"""On-disk form of one chunk: a chunk record (`cache/record.py`) in a file of its own.

The record names its chunk key and every read checks it: a valid file under
another chunk's name (copied, renamed or planted) is a miss, never that chunk.
"""

from __future__ import annotations

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
from lmc_connector.checksum import crc32
from lmc_connector.tokens import ChunkKey

__all__ = ["HEADER_SIZE", "DiskFormatError", "DiskRecord", "read_chunk", "verify_file"]
#: Bytes read at a time when a file is verified without loading it.
VERIFY_BLOCK = 1 << 20


class DiskFormatError(RecordFormatError):
    """The file is not a valid chunk file; drop it and recompute."""


@dataclass(frozen=True, slots=True)
class DiskRecord:
    """What the disk index keeps per chunk: no data, just enough to account and report."""

    nbytes: int
    num_tokens: int
    method: str | None


def write_chunk(path: Path, key: ChunkKey, chunk: Chunk) -> DiskRecord:
    """Write the file of chunk `key` at `path` (callers write a temporary name and rename it)."""
    data = payload(chunk)
    with open(path, "wb") as f:
        f.write(pack_header(key, chunk, data))
        f.write(data)
    return DiskRecord(HEADER_SIZE + data.nbytes, chunk.num_tokens, chunk.method)


def verify_file(path: Path, key: ChunkKey) -> DiskRecord:
    """Check the whole file of chunk `key` (name, size, checksum) without building the chunk.

    Used at start-up, before a file found on disk is reported as cached; a
    RecordFormatError (or OSError) when it could not be served.
    """
    with open(path, "rb") as f:
        header = parse_header(f.read(HEADER_SIZE), str(path), key)
        crc, size = header.crc_start, 0
        while block := f.read(VERIFY_BLOCK):
            crc = crc32(block, crc)
            size += len(block)
    if size != header.payload_len:
        raise DiskFormatError(f"{path}: payload is {size} bytes, header says {header.payload_len}")
    header.verify(crc)
    return DiskRecord(HEADER_SIZE + header.payload_len, header.num_tokens, header.method)


def read_chunk(path: Path, key: ChunkKey) -> Chunk:
    """Read and verify the file of chunk `key`; raise a RecordFormatError on any mismatch."""
    raw = bytearray(path.read_bytes())
    header = parse_header(raw, str(path), key)
    header.verify(crc32(memoryview(raw)[HEADER_SIZE:], header.crc_start))
    return header.chunk(raw, HEADER_SIZE)
