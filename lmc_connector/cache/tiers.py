"""The mechanism under the engine: tiers, pins, room-making, spills and events.

One lock guards every index, pin and event. File contents are never read or
written under it: a disk read touches the index under the lock, reads the
file outside it, and drops the entry afterwards only if that same entry
turned out missing or corrupt. A disk write writes a temporary file outside
the lock, then, under it, checks that the write is still wanted (the chunk
was not removed or replaced meanwhile), makes room and renames the file into
place, so the index and the files change together.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from lmc_connector.cache.backends import CPU, DISK, LocalCPUBackend
from lmc_connector.cache.backends import LocalDiskBackend as DiskBackend
from lmc_connector.cache.backends.disk import discard
from lmc_connector.cache.backends.diskfile import DiskFormatError, DiskRecord
from lmc_connector.cache.chunk import Chunk
from lmc_connector.cache.errors import UnknownLocationError

logger = logging.getLogger(__name__)

Backend = LocalCPUBackend | DiskBackend
#: What a load saw, to detect a concurrent change before swapping: the chunk or disk record.
Marker = Chunk | DiskRecord | None


class CacheEventSink(Protocol):
    """Told of every chunk entering or leaving a location, under the engine lock.

    Implementations must be quick and must not call back into the engine
    (the control agent appends to a queue).
    """

    def chunks_admitted(self, location: str, keys: Sequence[int]) -> None: ...

    def chunks_evicted(self, location: str, keys: Sequence[int]) -> None: ...


class Tiers:
    def __init__(self, backends: dict[str, Backend]) -> None:
        self.lock = threading.RLock()
        self.backends = backends
        self.pins: Counter[int] = Counter()
        self._sinks: list[CacheEventSink] = []
        #: Chunks evicted from the CPU tier, waiting to be written to the disk tier, each with
        #: a token that `cancel_spills` withdraws when the chunk is removed meanwhile.
        self._spills: list[tuple[int, Chunk, object]] = []
        self._spilling: dict[int, object] = {}
        self._warned_oversized = False

    @property
    def cpu(self) -> LocalCPUBackend | None:
        cpu = self.backends.get(CPU)
        return cpu if isinstance(cpu, LocalCPUBackend) else None

    @property
    def disk(self) -> DiskBackend | None:
        disk = self.backends.get(DISK)
        return disk if isinstance(disk, DiskBackend) else None

    def backend(self, location: str) -> Backend:
        try:
            return self.backends[location]
        except KeyError:
            raise UnknownLocationError(location, self.backends) from None

    def select(self, locations: Iterable[str] | None) -> list[Backend]:
        if locations is None:
            return list(self.backends.values())
        return [self.backend(name) for name in locations]

    def prefix_hits(self, keys: Sequence[int], present: Callable[[int], bool]) -> int:
        """How many leading keys satisfy `present` (call with the lock held)."""
        hits = 0
        for key in keys:
            if not present(key):
                break
            hits += 1
        return hits

    def pin(self, keys: Iterable[int]) -> None:
        with self.lock:
            self.pins.update(keys)

    def unpin(self, keys: Iterable[int]) -> None:
        """Drop one pin per key; a key pinned once is unpinned."""
        with self.lock:
            for key in keys:
                if self.pins[key] <= 1:
                    self.pins.pop(key, None)
                else:
                    self.pins[key] -= 1

    # -- events ----------------------------------------------------------------------------

    def subscribe(self, sink: CacheEventSink) -> None:
        with self.lock:
            self._sinks.append(sink)

    def unsubscribe(self, sink: CacheEventSink) -> None:
        with self.lock:
            if sink in self._sinks:
                self._sinks.remove(sink)

    def emit_admit(self, location: str, keys: Sequence[int]) -> None:
        if keys:
            for sink in self._sinks:
                sink.chunks_admitted(location, keys)

    def emit_evict(self, location: str, keys: Sequence[int]) -> None:
        if keys:
            for sink in self._sinks:
                sink.chunks_evicted(location, keys)

    # -- the CPU tier (lock held) ------------------------------------------------------------

    def insert(self, cpu: LocalCPUBackend, key: int, chunk: Chunk) -> bool:
        """Store a chunk in the CPU tier, evicting (and queueing spills) to make room."""
        if not self.make_room(cpu, cpu.size_of(chunk), exclude=key):
            self._warn_no_room(cpu, chunk.nbytes)
            return False
        cpu.write(key, chunk)
        self.emit_admit(cpu.name, [key])
        return True

    def make_room(self, backend: Backend, need: int, exclude: int) -> bool:
        victims = backend.victims(need, lambda k: k == exclude or k in self.pins)
        if victims is None:
            return False
        disk = self.disk
        for key in victims:
            if isinstance(backend, LocalCPUBackend) and disk is not None and key not in disk:
                chunk = backend.peek(key)
                if chunk is not None:
                    token = object()
                    self._spilling[key] = token
                    self._spills.append((key, chunk, token))
            backend.remove(key)
            self.emit_evict(backend.name, [key])
        return True

    def _warn_no_room(self, backend: Backend, nbytes: int) -> None:
        if nbytes > backend.capacity_bytes:
            if not self._warned_oversized:
                self._warned_oversized = True
                logger.warning(
                    "%s: a %d-byte chunk is larger than the whole tier (%d bytes): "
                    "raise its max size or lower chunk_size; such chunks are not cached",
                    backend.name,
                    nbytes,
                    backend.capacity_bytes,
                )
        else:
            logger.debug("%s full: a chunk does not fit beside pinned chunks", backend.name)

    # -- the disk tier (lock NOT held) -------------------------------------------------------

    def flush_spills(self) -> None:
        """Write the chunks the CPU tier evicted to the disk tier; call without the lock."""
        disk = self.disk
        while True:
            with self.lock:
                if not self._spills:
                    return
                key, chunk, token = self._spills.pop()
            if disk is not None:
                wanted = lambda k=key, t=token: self._spilling.get(k) is t  # noqa: E731
                self.disk_write(disk, key, chunk, wanted)
            with self.lock:
                if self._spilling.get(key) is token:
                    del self._spilling[key]

    def cancel_spills(self, keys: Iterable[int] | None = None) -> None:
        """Withdraw pending spills of `keys` (all when None): those chunks were removed."""
        with self.lock:
            if keys is None:
                self._spilling.clear()
                self._spills.clear()
                return
            gone = set(keys)
            for key in gone:
                self._spilling.pop(key, None)
            self._spills = [s for s in self._spills if s[0] not in gone]

    def disk_read(self, disk: DiskBackend, key: int) -> tuple[Marker, Chunk | None]:
        """Read and verify a chunk file; a missing or corrupt one is dropped from the index."""
        with self.lock:
            record = disk.touch(key)
        if record is None:
            return None, None
        try:
            return record, disk.read_file(key)
        except FileNotFoundError:
            reason = None
        except (DiskFormatError, OSError) as e:
            reason = str(e)
        with self.lock:
            if disk.peek(key) is record:
                if reason is None:
                    disk.forget(key)
                else:
                    logger.error("cache file dropped (recomputed on next use): %s", reason)
                    disk.remove(key)
                self.emit_evict(disk.name, [key])
        return None, None

    def disk_write(
        self,
        disk: DiskBackend,
        key: int,
        chunk: Chunk,
        still_wanted: Callable[[], bool] = lambda: True,
    ) -> bool:
        """Store a chunk file; False when it cannot be kept or is no longer wanted.

        `still_wanted` is asked under the lock just before the file goes into
        place, after the slow write.
        """
        try:
            tmp, record = disk.write_temporary(key, chunk)
        except OSError as e:
            logger.error("%s: cannot write a chunk (%s); it is not cached on disk", disk.name, e)
            return False
        installed = False
        with self.lock:
            old = disk.peek(key)
            grow = record.nbytes - (old.nbytes if old is not None else 0)
            if not still_wanted():
                pass
            elif grow > 0 and not self.make_room(disk, grow, exclude=key):
                self._warn_no_room(disk, record.nbytes)
            else:
                try:
                    disk.install(key, tmp, record)
                    installed = True
                except OSError as e:
                    logger.error("%s: cannot place a chunk file (%s)", disk.name, e)
                if installed and old is None:
                    self.emit_admit(disk.name, [key])
        if not installed:
            discard(tmp)
        return installed

    # -- either tier (lock NOT held) ---------------------------------------------------------

    def load(self, backend: Backend, key: int) -> tuple[Marker, Chunk | None]:
        """The chunk stored under `key` in `backend`, with a marker of what was seen."""
        if isinstance(backend, LocalCPUBackend):
            with self.lock:
                chunk = backend.peek(key)
            return chunk, chunk
        return self.disk_read(backend, key)

    def store(self, backend: Backend, key: int, chunk: Chunk) -> bool:
        """Add a chunk to `backend` unless it is there already."""
        if isinstance(backend, LocalCPUBackend):
            with self.lock:
                stored = key in backend or self.insert(backend, key, chunk)
            self.flush_spills()
            return stored
        return key in backend or self.disk_write(backend, key, chunk)

    def replace(self, backend: Backend, key: int, marker: Marker, chunk: Chunk) -> bool | None:
        """Swap the chunk under `key` for an equivalent one of another form.

        None when someone changed or removed it since `marker` was seen;
        False when the new form does not fit.
        """
        if isinstance(backend, LocalCPUBackend):
            with self.lock:
                if backend.peek(key) is not marker or not isinstance(marker, Chunk):
                    return None
                grow = backend.size_of(chunk) - backend.size_of(marker)
                if grow > 0 and not self.make_room(backend, grow, exclude=key):
                    return False
                backend.write(key, chunk)
            self.flush_spills()
            return True
        with self.lock:
            if backend.peek(key) is not marker:
                return None
        if self.disk_write(backend, key, chunk, lambda: backend.peek(key) is marker):
            return True
        with self.lock:
            return None if backend.peek(key) is not marker else False
