"""LocalDiskBackend: one file per chunk under `<local_disk>/<layout fingerprint>/`."""

from __future__ import annotations

import logging
from pathlib import Path

from lmc_connector.cache.backends.diskfile import (
    HEADER_SIZE,
    DiskFormatError,
    DiskRecord,
    read_chunk,
    read_record,
    write_chunk,
)
from lmc_connector.cache.backends.lru import IndexedTier
from lmc_connector.cache.chunk import Chunk

logger = logging.getLogger(__name__)
SUFFIX = ".kvc"


class CorruptChunkError(DiskFormatError):
    """A chunk file failed verification; it has been deleted and must be recomputed."""


class LocalDiskBackend(IndexedTier[DiskRecord]):
    """Chunk files with an in-memory LRU index; files from an earlier run are re-admitted.

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
        for stale in self.root.glob(f".*{SUFFIX}.*.tmp"):
            stale.unlink(missing_ok=True)
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

    def _path(self, key: int) -> Path:
        return self.root / f"{key:016x}{SUFFIX}"

    def read(self, key: int) -> Chunk | None:
        """Load and verify a chunk; a corrupt file is deleted and raises CorruptChunkError."""
        if self._index.touch(key) is None:
            return None
        path = self._path(key)
        try:
            return read_chunk(path)
        except (DiskFormatError, OSError) as e:
            self.remove(key)
            raise CorruptChunkError(f"cache file dropped: {e}") from e

    def write(self, key: int, chunk: Chunk) -> None:
        self._index.set(key, write_chunk(self._path(key), chunk))

    def remove(self, key: int) -> bool:
        self._path(key).unlink(missing_ok=True)
        return self._index.pop(key) is not None

    def size_of(self, chunk: Chunk) -> int:
        return HEADER_SIZE + chunk.nbytes
