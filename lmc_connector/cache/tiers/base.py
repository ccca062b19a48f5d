"""The contract of a cache location (a tier), and what the tiers of one engine share.

A worker's cache is a list of tiers, nearest first (CPU memory, then disk,
then whatever later tiers add). The engine walks that list and never asks
which class a tier is: everything a tier does differently lives behind `Tier`.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

from lmc_connector.cache.chunk import Chunk, ChunkForm
from lmc_connector.cache.stats import CacheStats
from lmc_connector.tokens import ChunkKey

if TYPE_CHECKING:
    from lmc_connector.cache.tiers.shelf import CalibrationShelf

logger = logging.getLogger(__name__)

#: What a `load` saw (the chunk, or a tier's record of it), handed back to `replace` so that a
#: concurrent change is detected before a chunk is swapped.
Marker = object


def leading(flags: Sequence[bool]) -> int:
    """How many of `flags` are true before the first false one (the hit prefix)."""
    return next((i for i, flag in enumerate(flags) if not flag), len(flags))


class CacheEventSink(Protocol):
    """Told of every chunk entering or leaving a location, under the cache lock.

    Implementations must be quick and must not call back into the cache (the
    control agent appends to a buffer).
    """

    def chunks_admitted(self, location: str, keys: Sequence[ChunkKey]) -> None: ...

    def chunks_evicted(self, location: str, keys: Sequence[ChunkKey]) -> None: ...


@dataclass(frozen=True, slots=True)
class TierUsage:
    chunks: int
    used_bytes: int
    capacity_bytes: int


class TierContext:
    """What the tiers of one engine share: one lock, the pins, the chunk-event sinks, the
    spills in flight and the load/save counters (`stats`, which has its own lock).

    Owned by the engine and used from any thread. `lock` guards every tier's
    index, the pins and the spill tokens; nothing holding it does file or
    network I/O. Chunk events are emitted under it, in the order the indexes
    changed.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.pins: Counter[ChunkKey] = Counter()
        self._sinks: list[CacheEventSink] = []
        #: Chunks on their way from one tier to the next, each with a token that a removal
        #: withdraws, so that a chunk removed meanwhile does not come back.
        self._spilling: dict[ChunkKey, object] = {}
        self._warned_oversized: set[str] = set()
        self.stats = CacheStats()

    # -- pins ------------------------------------------------------------------------------

    def pin(self, keys: Iterable[ChunkKey]) -> None:
        with self.lock:
            self.pins.update(keys)

    def unpin(self, keys: Iterable[ChunkKey]) -> None:
        """Drop one pin per key; a key pinned once is unpinned."""
        with self.lock:
            for key in keys:
                if self.pins[key] <= 1:
                    self.pins.pop(key, None)
                else:
                    self.pins[key] -= 1

    def is_pinned(self, key: ChunkKey) -> bool:
        return key in self.pins

    # -- chunk events ----------------------------------------------------------------------

    def subscribe(self, sink: CacheEventSink) -> None:
        with self.lock:
            self._sinks.append(sink)

    def unsubscribe(self, sink: CacheEventSink) -> None:
        with self.lock:
            if sink in self._sinks:
                self._sinks.remove(sink)

    def admitted(self, location: str, keys: Sequence[ChunkKey]) -> None:
        if keys:
            for sink in self._sinks:
                sink.chunks_admitted(location, keys)

    def evicted(self, location: str, keys: Sequence[ChunkKey]) -> None:
        if keys:
            for sink in self._sinks:
                sink.chunks_evicted(location, keys)

    # -- spills (lock held) ----------------------------------------------------------------

    def start_spill(self, key: ChunkKey) -> Callable[[], bool]:
        """Register a spill of `key`; the returned check says whether it is still wanted."""
        token = object()
        self._spilling[key] = token
        return lambda: self._spilling.get(key) is token

    def end_spill(self, key: ChunkKey, still_wanted: Callable[[], bool]) -> None:
        if still_wanted():
            del self._spilling[key]

    def cancel_spills(self, keys: Iterable[ChunkKey] | None = None) -> None:
        """Withdraw spills of `keys` (all when None): those chunks were removed."""
        with self.lock:
            if keys is None:
                self._spilling.clear()
            else:
                for key in keys:
                    self._spilling.pop(key, None)

    def warn_no_room(self, location: str, nbytes: int, capacity: int) -> None:
        if nbytes <= capacity:
            logger.debug("%s full: a chunk does not fit beside pinned chunks", location)
        elif location not in self._warned_oversized:
            self._warned_oversized.add(location)
            logger.warning(
                "%s: a %d-byte chunk is larger than the whole tier (%d bytes): raise its max "
                "size or lower chunk_size; such chunks are not cached there",
                location,
                nbytes,
                capacity,
            )


class Tier(ABC):
    """One location of a worker's chunk cache, named as in LMCache (`LocalCPUBackend`, ...).

    The engine calls every method without holding `ctx.lock`, from vLLM's
    worker thread, the scheduler's lookup thread and the control agent's
    threads at once; a tier takes the lock for its own bookkeeping and never
    does I/O while holding it. A tier whose `answers_from_memory` is true
    answers `held` and `touch` from memory, so the engine may also call those
    two with the lock held (it is re-entrant) to pin what it found atomically.
    Methods that cannot do what was asked return a falsy value; they raise
    only for programming errors.
    """

    name: ClassVar[str]
    #: `held` and `touch` need no I/O (see the class docstring).
    answers_from_memory: ClassVar[bool] = True
    #: How vLLM files a hit served from here (a `CacheHitSource` value: "host", "disk",
    #: "p2p"); a tier that is none of those stays "external_unspecified".
    hit_source: ClassVar[str] = "external_unspecified"
    #: The medium of vLLM's KV events (`BlockStored`/`BlockRemoved`) for chunks entering and
    #: leaving this tier ("CPU", "STORAGE"); None: its chunk events are not published.
    event_medium: ClassVar[str | None] = None
    #: Other instances read and write this tier too (a shared store): an instance's cache
    #: reset leaves it alone unless `reset_shared_store` is set.
    shared: ClassVar[bool] = False

    def __init__(self, ctx: TierContext) -> None:
        self.ctx = ctx

    @abstractmethod
    def held(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Whether each key is stored here (recency unchanged)."""

    @abstractmethod
    def touch(self, key: ChunkKey) -> bool:
        """Whether `key` is stored here; if so it becomes the most recently used."""

    @abstractmethod
    def chunk_keys(self) -> list[ChunkKey]:
        """Every key stored here (what the controller's index is told after a resync)."""

    @abstractmethod
    def usage(self) -> TierUsage: ...

    @abstractmethod
    def load(self, key: ChunkKey) -> tuple[Marker, Chunk | None]:
        """The chunk stored under `key`, with a marker of what was seen; (None, None) on a miss.

        A copy found damaged is dropped (and reported evicted), never returned.
        """

    def load_many(self, keys: Sequence[ChunkKey]) -> list[Chunk | None]:
        """The chunks of `keys` (None for each miss), for the load of a prompt's chunks.

        A tier that pays a round trip per request (a shared store, a peer)
        overrides this to fetch them together; it may stop fetching after the
        first miss, since only the leading chunks are used. Default: `load`
        one key at a time, stopping at the first miss.
        """
        out: list[Chunk | None] = []
        for key in keys:
            _, chunk = self.load(key)
            if chunk is None:
                break
            out.append(chunk)
        return out + [None] * (len(keys) - len(out))

    @abstractmethod
    def store(
        self, key: ChunkKey, chunk: Chunk, still_wanted: Callable[[], bool] | None = None
    ) -> bool:
        """Add a chunk unless `key` is already here; False when it cannot be kept.

        Room is made by evicting unpinned chunks, least recently used first.
        `still_wanted`, when given, is asked under the lock right before the
        chunk goes in (after any slow write): a False answer drops the write.
        """

    @abstractmethod
    def replace(self, key: ChunkKey, marker: Marker, chunk: Chunk) -> bool | None:
        """Swap the chunk under `key` for an equivalent one of another form (encoded or plain).

        None when someone changed or removed it since `marker` was seen;
        False when the new form does not fit.
        """

    @abstractmethod
    def remove(self, keys: Sequence[ChunkKey]) -> int:
        """Remove these chunks (pinned ones too); returns how many were here."""

    @abstractmethod
    def remove_seen(self, key: ChunkKey, marker: Marker) -> bool:
        """Remove `key` only if it still holds what `marker` saw (the last step of a move)."""

    @abstractmethod
    def clear(self) -> tuple[int, int]:
        """Remove every unpinned chunk; returns (removed, kept because pinned)."""

    def forms(self, keys: Sequence[ChunkKey]) -> list[ChunkForm | None]:
        """What each key holds here (tokens, codec), None where it is not held.

        Called without the lock. This default reads every chunk; a tier that
        keeps this in its index (or in a store's metadata) overrides it.
        """
        out: list[ChunkForm | None] = []
        for key in keys:
            _, chunk = self.load(key)
            out.append(None if chunk is None else chunk.form)
        return out

    def open(self) -> None:
        """Prepare the tier (create folders, re-admit what an earlier run left); no-op here."""
        return

    def close(self) -> None:
        """Stop background work and release resources; no-op here."""
        return

    def flush(self) -> None:
        """Finish the background work earlier calls queued (spills to the next tier); no-op
        here. Called without the lock after operations that may have queued some."""
        return

    def saved(self, key: ChunkKey, chunk: Chunk) -> None:
        """A chunk was just saved into the nearest tier; a write-through tier (a shared
        store) takes a copy here without blocking the caller. No-op here."""
        return

    def calibration_shelf(self) -> CalibrationShelf | None:
        """Where this tier keeps the calibrations its layout's encoded chunks need (a tier
        that outlives the process or is shared with other instances has one); None here."""
        return None
