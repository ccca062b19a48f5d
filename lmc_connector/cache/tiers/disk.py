"""LocalDiskBackend: one file per chunk under `<local_disk>/<layout fingerprint>/`."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from typing_extensions import override

from lmc_connector.cache.chunk import Chunk
from lmc_connector.cache.record import RecordFormatError
from lmc_connector.cache.tiers.base import Marker, TierContext
from lmc_connector.cache.tiers.diskfile import (
    HEADER_SIZE,
    DiskRecord,
    read_chunk,
    verify_file,
    write_chunk,
)
from lmc_connector.cache.tiers.indexed import IndexedTier
from lmc_connector.cache.tiers.shelf import CalibrationShelf, DiskShelf
from lmc_connector.tokens import ChunkKey

logger = logging.getLogger(__name__)
SUFFIX = ".kvc"
#: The folder of this layout's calibrations, beside its chunk files.
CALIBRATIONS = "calibrations"
#: Seconds between two progress lines while files found at start are verified.
VERIFY_LOG_EVERY_S = 5.0


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0  # gone meanwhile: verifying it fails and drops it


#: Temporary files of another host (a shared folder) older than this are left-overs of an
#: interrupted write; younger ones may belong to a process writing right now. On this host the
#: writer's process id in the name says for sure.
STALE_TMP_S = 600.0
#: This host, in temporary file names: `.<key>.kvc.<host>-<pid>-<random>.tmp`.
HOST_TAG = hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True


def _left_over(path: Path, cutoff: float) -> bool:
    """Whether a temporary file belongs to no live writer (safe to delete)."""
    owner = path.name.split(".")[-2].split("-")
    if len(owner) == 3 and owner[0] == HOST_TAG and owner[1].isdigit():
        return not _pid_alive(int(owner[1]))
    return path.stat().st_mtime < cutoff


def discard(path: Path) -> None:
    """Delete a file; one already gone is fine, one that cannot be deleted is logged."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        logger.warning("cannot delete cache file %s: %s", path, e)


class LocalDiskBackend(IndexedTier[DiskRecord]):
    """Chunk files with an in-memory LRU index; files from an earlier run are re-admitted.

    Several processes may share the folder (data-parallel ranks, replicas): each writes
    its own temporary files (named after its host and process) and deletes another's
    only once that process is gone; a chunk file another process evicted is a miss here.

    Owns the folder of one layout (its name is the layout fingerprint, so a
    different model, rank or dtype never sees these files) and the index of
    the files in it. File contents are read and written without the cache
    lock: a write goes to a temporary file first, and only the rename into
    place (after checking the write is still wanted) and deletions happen
    under the lock, so the index and the files change together.
    """

    name = "LocalDiskBackend"
    hit_source = "disk"
    event_medium = "STORAGE"

    def __init__(self, ctx: TierContext, root: Path, capacity_bytes: int) -> None:
        super().__init__(ctx, capacity_bytes, lambda r: r.nbytes)
        self.root = root

    @override
    def open(self) -> None:
        """Create the folder and re-admit the files already there once each is verified."""
        self.root.mkdir(parents=True, exist_ok=True)
        cutoff = time.time() - STALE_TMP_S
        for stale in self.root.glob(f".*{SUFFIX}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                if _left_over(stale, cutoff):
                    stale.unlink()
        found = self._verified(sorted(self.root.glob(f"*{SUFFIX}"), key=_mtime))
        with self.ctx.lock:
            for key, record in found:
                self._index.set(key, record)
            self.ctx.admitted(self.name, [key for key, _ in found])
            # A folder larger than this tier's capacity (lowered since, or filled by other
            # processes sharing it): the oldest files go until the rest fits.
            self._make_room(0)

    def _verified(self, paths: list[Path]) -> list[tuple[ChunkKey, DiskRecord]]:
        """The files of `paths` whose name, header and checksum agree; the others are deleted.

        Every byte is read once, so a file that would fail its first load is never
        reported as cached; progress is logged for large folders.
        """
        found: list[tuple[ChunkKey, DiskRecord]] = []
        started = last_log = time.monotonic()
        nbytes = 0
        for path in paths:
            try:
                key = ChunkKey(int(path.stem, 16))
                record = verify_file(path, key)
            except ValueError as e:  # not a chunk file of this layout, or damaged
                logger.warning("dropping unusable cache file %s: %s", path, e)
                discard(path)
                continue
            except OSError as e:  # the file may be fine: left for the next start
                logger.warning("cannot read cache file %s now (%s); not re-admitted", path, e)
                continue
            found.append((key, record))
            nbytes += record.nbytes
            now = time.monotonic()
            if now - last_log >= VERIFY_LOG_EVERY_S:
                last_log = now
                logger.info(
                    "disk tier %s: verified %d of %d files (%.0f MB/s)",
                    self.root,
                    len(found),
                    len(paths),
                    nbytes / (now - started) / 1e6,
                )
        if found:
            logger.info(
                "disk tier %s: re-admitted %d chunks (%.1f GB verified in %.1f s)",
                self.root,
                len(found),
                nbytes / 1e9,
                time.monotonic() - started,
            )
        return found

    def path(self, key: ChunkKey) -> Path:
        return self.root / f"{key:016x}{SUFFIX}"

    @override
    def calibration_shelf(self) -> CalibrationShelf:
        return DiskShelf(self.root / CALIBRATIONS)

    @override
    def size_of(self, chunk: Chunk) -> int:
        return HEADER_SIZE + chunk.nbytes

    @override
    def load(self, key: ChunkKey) -> tuple[Marker, Chunk | None]:
        with self.ctx.lock:
            record = self._index.peek(key)
        if record is None:
            return None, None
        try:
            return record, read_chunk(self.path(key), key)
        except FileNotFoundError:
            damaged = None
        except RecordFormatError as e:
            damaged = str(e)
        except OSError as e:  # the file may be fine (no descriptors left, a flaky disk)
            logger.error("cannot read a cache file now (a miss; the file stays): %s", e)
            return None, None
        with self.ctx.lock:
            if self._index.peek(key) is record:
                self._index.pop(key)
                if damaged is not None:
                    logger.error("cache file dropped (recomputed on next use): %s", damaged)
                    discard(self.path(key))
                self.ctx.evicted(self.name, [key])
        return None, None

    @override
    def store(
        self, key: ChunkKey, chunk: Chunk, still_wanted: Callable[[], bool] | None = None
    ) -> bool:
        with self.ctx.lock:
            if key in self._index:
                return True
        return self._write(key, chunk, still_wanted or (lambda: key not in self._index))

    @override
    def replace(self, key: ChunkKey, marker: Marker, chunk: Chunk) -> bool | None:
        with self.ctx.lock:
            if self._index.peek(key) is not marker:
                return None
        if self._write(key, chunk, lambda: self._index.peek(key) is marker):
            return True
        with self.ctx.lock:
            return None if self._index.peek(key) is not marker else False

    @override
    def remove(self, keys: Sequence[ChunkKey]) -> int:
        self.ctx.cancel_spills(keys)
        return super().remove(keys)

    @override
    def clear(self) -> tuple[int, int]:
        self.ctx.cancel_spills()
        return super().clear()

    @override
    def _drop(self, key: ChunkKey) -> bool:
        """Forget `key` and delete its file; a file nobody indexed is left alone."""
        if self._index.pop(key) is None:
            return False
        discard(self.path(key))
        return True

    def _write(self, key: ChunkKey, chunk: Chunk, still_wanted: Callable[[], bool]) -> bool:
        """Write a chunk file and put it in place if `still_wanted()` (asked under the lock)."""
        owner = f"{HOST_TAG}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        tmp = self.root / f".{key:016x}{SUFFIX}.{owner}.tmp"
        try:
            record = write_chunk(tmp, key, chunk)
        except OSError as e:
            discard(tmp)
            logger.error("%s: cannot write a chunk (%s); it is not cached on disk", self.name, e)
            return False
        except BaseException:
            discard(tmp)
            raise
        installed = False
        with self.ctx.lock:
            old = self._index.peek(key)
            grow = record.nbytes - (old.nbytes if old is not None else 0)
            if not still_wanted():
                pass
            elif grow > 0 and not self._make_room(grow, exclude=key):
                self._no_room(record.nbytes)
            else:
                try:
                    os.replace(tmp, self.path(key))
                    installed = True
                except OSError as e:
                    logger.error("%s: cannot place a chunk file (%s)", self.name, e)
                if installed:
                    self._index.set(key, record)
                    if old is None:
                        self.ctx.admitted(self.name, [key])
        if not installed:
            discard(tmp)
        return installed
