"""One chunk as bytes, wherever it leaves memory (disk files, shared-store values).

    header   "<4sHBQ16sI4IQI": magic, version, encoded flag, chunk key, name (dtype or codec),
             num_tokens, shape (4 x u32; zeros when encoded), payload length, crc32 of the
             header fields and the payload
    payload  the raw tensor bytes of a plain chunk, or the codec blob of an encoded one as is

Everything is checked before a chunk is built from it, the chunk key included: a
valid record found under another chunk's name (a file copied or renamed, a value
written under another key) is refused, never served as that chunk. Nothing is
ever unpickled.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch
from typing_extensions import Buffer

from lmc_connector.cache.chunk import Chunk
from lmc_connector.cache.layout import DTYPES, dtype_name
from lmc_connector.checksum import crc32
from lmc_connector.tokens import ChunkKey

MAGIC = b"LMCD"
#: 2: the header names the chunk key (records of version 1 are refused, so recomputed).
VERSION = 2
_FIELDS = struct.Struct("<4sHBQ16sI4IQ")
_CRC = struct.Struct("<I")
HEADER_SIZE = _FIELDS.size + _CRC.size


class RecordFormatError(ValueError):
    """The bytes are not a valid chunk record (corrupted, truncated, foreign); drop them."""


def payload(chunk: Chunk) -> memoryview:
    """The payload bytes of `chunk`, without a copy (a view of its tensor or blob)."""
    if chunk.blob is not None:
        return memoryview(chunk.blob)
    assert chunk.kv is not None
    kv = chunk.kv.contiguous()
    return memoryview(kv.view(torch.uint8).numpy().data).cast("B")


def pack_header(key: ChunkKey, chunk: Chunk, data: Buffer) -> bytes:
    """The header of chunk `key` whose payload is `data` (`payload(chunk)`), checksum
    included."""
    if chunk.blob is not None:
        assert chunk.method is not None
        name, shape = chunk.method.encode(), (0, 0, 0, 0)
    else:
        assert chunk.kv is not None
        s = tuple(chunk.kv.shape)
        name, shape = dtype_name(chunk.kv.dtype).encode(), (s[0], s[1], s[2], s[3])
    view = memoryview(data)
    fields = _FIELDS.pack(
        MAGIC, VERSION, int(chunk.encoded), key, name, chunk.num_tokens, *shape, view.nbytes
    )
    return fields + _CRC.pack(crc32(view, crc32(fields)))


@dataclass(frozen=True, slots=True)
class RecordHeader:
    """A parsed header; `where` names the record's home in error messages."""

    where: str
    encoded: bool
    #: The codec of an encoded chunk, the dtype name of a plain one.
    name: str
    num_tokens: int
    shape: tuple[int, int, int, int]
    payload_len: int
    crc: int
    #: crc32 of the header fields: continue it over the payload with crc32(data, start).
    crc_start: int

    @property
    def method(self) -> str | None:
        """The codec of an encoded chunk; None for a plain one."""
        return self.name if self.encoded else None

    def verify(self, crc: int) -> None:
        """Raise unless `crc` (of the header fields and the payload) matches the header."""
        if crc != self.crc:
            raise RecordFormatError(f"{self.where}: checksum mismatch (corrupted)")

    def plain_layout(self) -> tuple[tuple[int, int, int, int], torch.dtype]:
        """Shape and dtype of a plain chunk, checked against the payload length."""
        if self.encoded or self.name not in DTYPES:
            raise RecordFormatError(f"{self.where}: not a plain chunk of a known dtype")
        dtype = DTYPES[self.name]
        s0, s1, s2, s3 = self.shape
        if s0 * s1 * s2 * s3 * dtype.itemsize != self.payload_len:
            raise RecordFormatError(f"{self.where}: shape {self.shape} does not match the payload")
        return self.shape, dtype

    def chunk(self, data: Buffer, offset: int = 0) -> Chunk:
        """The chunk whose verified payload is `data[offset:]` (a plain chunk views it, no copy;
        `data` must be writable for that, e.g. a bytearray)."""
        view = memoryview(data)[offset:]
        if view.nbytes != self.payload_len:
            raise RecordFormatError(
                f"{self.where}: payload is {view.nbytes} bytes, header says {self.payload_len}"
            )
        if self.encoded:
            return Chunk(self.num_tokens, blob=bytes(view), method=self.name)
        shape, dtype = self.plain_layout()
        kv = torch.frombuffer(data, dtype=torch.uint8, offset=offset, count=self.payload_len)
        return Chunk(self.num_tokens, kv=kv.view(dtype).view(shape), borrowed=True)


def parse_header(raw: Buffer, where: str, key: ChunkKey) -> RecordHeader:
    """Parse and check the first HEADER_SIZE bytes of `raw` as the record of chunk `key` (not
    the payload's checksum)."""
    view = memoryview(raw)
    if view.nbytes < HEADER_SIZE:
        raise RecordFormatError(f"{where}: truncated header")
    fields = _FIELDS.unpack_from(view)
    magic, version, encoded, found, name, num_tokens, s0, s1, s2, s3, payload_len = fields
    if magic != MAGIC or version != VERSION:
        raise RecordFormatError(f"{where}: not a chunk record of format version {VERSION}")
    if found != key:
        raise RecordFormatError(f"{where}: holds chunk {found:016x}, not {key:016x}")
    (crc,) = _CRC.unpack_from(view, _FIELDS.size)
    return RecordHeader(
        where=where,
        encoded=bool(encoded),
        name=name.rstrip(b"\0").decode(errors="replace"),
        num_tokens=num_tokens,
        shape=(s0, s1, s2, s3),
        payload_len=payload_len,
        crc=crc,
        crc_start=crc32(view[: _FIELDS.size]),
    )
