"""LocalDiskBackend: one file per chunk under `<local_disk>/<layout fingerprint>/`."""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from pathlib import Path

from lmc_connector.cache.backends.diskfile import (
    HEADER_SIZE,
    DiskRecord,
    read_chunk,
    read_record,
    write_chunk,
)
from lmc_connector.cache.backends.lru import IndexedTier
from lmc_connector.cache.chunk import Chunk

logger = logging.getLogger(__name__)
SUFFIX = ".kvc"
#: Temporary files older than this are left-overs of an interrupted write; younger ones may
#: belong to another process writing to the same folder right now.
STALE_TMP_S = 600.0


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

    Index methods run under the engine lock; `*_file` methods do the I/O and
    are called without it.

    The folder name is the layout fingerprint, so a different model, rank or
    dtype never sees these files.
    """

    name = "LocalDiskBackend"

    def __init__(self, root: Path, capacity_bytes: int) -> None:
        self.root = root
        super().__init__(capacity_bytes, lambda r: r.nbytes)

    def open(self) -> list[int]:
        """Create the folder and re-admit the files already there; return their keys."""
        self.root.mkdir(parents=True, exist_ok=True)
        cutoff = time.time() - STALE_TMP_S
        for stale in self.root.glob(f".*{SUFFIX}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                if stale.stat().st_mtime < cutoff:
                    stale.unlink()
        files = sorted(self.root.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime)
        for path in files:
            try:
                key = int(path.stem, 16)
                record = read_record(path)
            except (ValueError, OSError) as e:
                logger.warning("dropping unreadable cache file %s: %s", path, e)
                path.unlink(missing_ok=True)
                continue
            self._index.set(key, record)
        return list(self._index)

    def path(self, key: int) -> Path:
        return self.root / f"{key:016x}{SUFFIX}"

    def read_file(self, key: int) -> Chunk:
        """Load and verify a chunk file (no index change; raises on a missing or bad file)."""
        return read_chunk(self.path(key))

    def write_temporary(self, key: int, chunk: Chunk) -> tuple[Path, DiskRecord]:
        """Write a chunk under a temporary name beside its final one (no index change)."""
        tmp = self.root / f".{key:016x}{SUFFIX}.{uuid.uuid4().hex}.tmp"
        try:
            return tmp, write_chunk(tmp, chunk)
        except BaseException:
            discard(tmp)
            raise

    def install(self, key: int, tmp: Path, record: DiskRecord) -> None:
        """Rename a written temporary file into place and index it (a metadata operation)."""
        os.replace(tmp, self.path(key))
        self._index.set(key, record)

    def forget(self, key: int) -> bool:
        """Drop the index entry only (its file is gone, or the caller deletes it later)."""
        return self._index.pop(key) is not None

    def remove(self, key: int) -> bool:
        """Drop the entry and its file; a file nobody indexed is left alone."""
        if not self.forget(key):
            return False
        discard(self.path(key))
        return True

    def size_of(self, chunk: Chunk) -> int:
        return HEADER_SIZE + chunk.nbytes
