"""A chunk's value in the shared store: a chunk record as a head key and piece keys.

    <chunk name>        the record header (`cache/record.py`): chunk key, dtype or codec, shape,
                        payload length, crc32 over header and payload
    <chunk name>:<i>    the payload, in pieces of PIECE_BYTES (the last one shorter)

Why pieces as string keys of their own: on this kind of machine Redis takes
1 MiB `SET`s about three times faster than one `SET` (or `HSET`) of 8-32 MiB,
and serves 1 MiB `GET`s faster than large ones (large values are fresh
allocations, page faults included, on both sides); the pieces are views of
the chunk's memory, so an upload copies nothing on this side. The head is
written last and read first: a reader that finds it finds every piece,
unless Redis evicted one since, which the reader sees (a missing piece, a
checksum that does not match) and treats as a miss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lmc_connector.cache.chunk import Chunk
from lmc_connector.cache.record import RecordFormatError, pack_header, parse_header, payload
from lmc_connector.checksum import crc32
from lmc_connector.ops.allocator import Allocator, empty_cpu
from lmc_connector.tokens import ChunkKey

#: Just under 1 MiB, so a piece with Redis's own string header stays in jemalloc's 1 MiB
#: size class (a piece of exactly 1 MiB would take 1.25 MiB of the store's memory).
PIECE_BYTES = (1 << 20) - 64


def pieces_for(nbytes: int) -> int:
    """Pieces of a payload of `nbytes` (at least one)."""
    return max(1, -(-nbytes // PIECE_BYTES))


@dataclass(frozen=True, slots=True)
class StoreValue:
    """The head and pieces of one chunk, ready to write (pieces are views, not copies)."""

    header: bytes
    pieces: list[memoryview]

    @property
    def nbytes(self) -> int:
        return len(self.header) + sum(p.nbytes for p in self.pieces)


def to_value(key: ChunkKey, chunk: Chunk) -> StoreValue:
    """The value of chunk `key` as it is (plain or encoded); keep `chunk` alive until written."""
    data = payload(chunk)
    count = pieces_for(data.nbytes)
    pieces = [data[i * PIECE_BYTES : (i + 1) * PIECE_BYTES] for i in range(count)]
    return StoreValue(pack_header(key, chunk, data), pieces)


class Assembler:
    """Builds one chunk from its head and pieces as they arrive; pieces may be added from
    another thread than the reader's (one at a time), while the next ones are fetched.

    Every payload is assembled into memory from `allocate` (numpy copies, which let go of
    the GIL): a plain chunk's tensor, or an encoded chunk's bytes (a flat uint8 tensor,
    which the blob views); its checksum is computed piece by piece while the piece is still
    in the processor's cache. Raises RecordFormatError for anything malformed, missing or
    not matching its checksum.
    """

    def __init__(
        self,
        head: bytes,
        where: str,
        key: ChunkKey,
        max_pieces: int,
        allocate: Allocator = empty_cpu,
    ) -> None:
        self.header = parse_header(head, where, key)
        self.count = pieces_for(self.header.payload_len)
        if self.count > max_pieces:
            raise RecordFormatError(
                f"{where}: {self.count} pieces is more than this layout's chunks need"
            )
        self._where = where
        self._crc = self.header.crc_start
        self._next = 0
        if self.header.encoded:
            self._memory = allocate((self.header.payload_len,), torch.uint8)
        else:
            self._memory = allocate(*self.header.plain_layout())
        self._target: np.ndarray = self._memory.view(torch.uint8).numpy().reshape(-1)

    def add(self, pieces: Sequence[bytes | None]) -> None:
        """The next pieces, in order."""
        for piece in pieces:
            start = self._next * PIECE_BYTES
            size = min(PIECE_BYTES, self.header.payload_len - start)
            if self._next >= self.count or piece is None or len(piece) != size:
                raise RecordFormatError(
                    f"{self._where}: piece {self._next} is missing or has the wrong size"
                )
            self._target[start : start + size] = np.frombuffer(piece, dtype=np.uint8)
            self._crc = crc32(piece, self._crc)
            self._next += 1

    def finish(self) -> Chunk:
        if self._next != self.count:
            raise RecordFormatError(f"{self._where}: {self._next} of {self.count} pieces")
        self.header.verify(self._crc)
        if self.header.encoded:
            blob = self._target.data.toreadonly()
            return Chunk(self.header.num_tokens, blob=blob, method=self.header.name)
        return Chunk(self.header.num_tokens, kv=self._memory)
