"""A load's chunks arriving from the store: every piece of a batch in one stream of round trips.

The heads of a batch are read first; then the pieces of all its chunks are asked for in
order, a few per round trip, and placed into each chunk's memory on the assembly thread
while the next ones travel (on the loading thread when it has a single core). One stream
instead of one chunk after the other: the next chunk's first pieces are on their way while
this chunk's last ones are placed, where before each chunk waited for its last copy (a
tenth of an 8 MiB chunk's load on our 2-core test machines), and small encoded chunks of
one piece each share round trips.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any

from lmc_connector.cache.chunk import Chunk
from lmc_connector.cache.record import RecordFormatError
from lmc_connector.cache.tiers.remote.values import Assembler
from lmc_connector.tokens import ChunkKey

logger = logging.getLogger(__name__)


@dataclass
class Arrival:
    """One chunk whose head was read: where its pieces go, and the first thing wrong with
    them (set by whichever thread places them)."""

    key: ChunkKey
    name: str
    head: bytes
    assembler: Assembler
    pieces: list[str]
    error: Exception | None = None
    placing: list[Future[None]] = field(default_factory=list)

    def place(self, pieces: list[Any]) -> None:
        """Add the next pieces; from the first that is wrong on, remember why and add none."""
        if self.error is not None:
            return
        try:
            for piece in pieces:
                if isinstance(piece, BaseException):
                    raise ValueError(f"not a chunk value ({piece})")
            self.assembler.add(pieces)
        except (RecordFormatError, ValueError) as e:
            self.error = e

    def finish(self) -> Chunk:
        """The chunk; raises RecordFormatError or ValueError for anything wrong with it."""
        if self.error is not None:
            raise self.error
        return self.assembler.finish()


class Arrivals:
    """The pieces of a batch of chunks, delivered in order by `take` (the callback of
    `ops.read_pieces`) and placed on `assembly` (one thread) or, without one, on the
    caller's. `take` and `ready` are called by the loading thread only."""

    def __init__(self, chunks: Sequence[Arrival], assembly: ThreadPoolExecutor | None) -> None:
        self.chunks = list(chunks)
        self._assembly = assembly
        self._owners = [i for i, a in enumerate(self.chunks) for _ in a.pieces]
        self._delivered = 0

    @property
    def names(self) -> list[str]:
        """Every piece name of the batch, in the order `take` expects them."""
        return [name for a in self.chunks for name in a.pieces]

    def take(self, pieces: list[Any]) -> None:
        owners = self._owners[self._delivered : self._delivered + len(pieces)]
        self._delivered += len(pieces)
        at = 0
        for owner, group in groupby(owners):
            count = len(list(group))
            arrival, part = self.chunks[owner], pieces[at : at + count]
            at += count
            if self._assembly is None:
                arrival.place(part)
            else:
                arrival.placing.append(self._assembly.submit(arrival.place, part))

    def ready(self, timeout_s: float) -> tuple[int, bool]:
        """How many leading chunks got every piece and had them placed, waiting for the
        placing at most `timeout_s`; and whether that wait ran out. A chunk whose placing
        failed for another reason than its bytes (this process's, e.g. out of memory) is
        not counted: a miss, logged, with nothing wrong with the stored value."""
        placing = [f for a in self.chunks for f in a.placing]
        _, late = futures.wait(placing, timeout=timeout_s)
        complete = received = 0
        for arrival in self.chunks:
            received += len(arrival.pieces)
            if received > self._delivered or any(f in late for f in arrival.placing):
                break
            if any(f.cancelled() for f in arrival.placing):
                break  # the tier is closing
            failed = [e for f in arrival.placing if (e := f.exception()) is not None]
            if failed:
                logger.error("%s: placing its pieces failed", arrival.name, exc_info=failed[0])
                break
            complete += 1
        return complete, bool(late)
