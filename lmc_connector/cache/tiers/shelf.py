"""Where a tier keeps calibrations beside its chunks: one shelf per layout, in the tier's place.

A calibrated codec (`kvtc`) encodes with a calibration fitted for one layout; every chunk it
encodes names that calibration by id, so whoever holds the chunk must find the calibration
to decode it. A shelf keeps calibration blobs by id and, per method, the id that method
encodes with now. `DiskShelf` lives in the disk tier's folder (`<local_disk>/<layout
fingerprint>/calibrations/`); the shared store has its own (`remote/shelf.py`).
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from abc import ABC, abstractmethod
from pathlib import Path

logger = logging.getLogger(__name__)

#: What a calibration id looks like (32 hex digits); anything else never reaches a file name.
CALIBRATION_ID = re.compile(r"^[0-9a-f]{32}$")
#: What a method name looks like (codec names of the registry).
METHOD = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def check_names(method: str | None = None, calibration_id: str | None = None) -> None:
    """Raise ValueError for a method or calibration id that is not one (never a path)."""
    if calibration_id is not None and not CALIBRATION_ID.match(calibration_id):
        raise ValueError(f"{calibration_id!r} is not a calibration id")
    if method is not None and not METHOD.match(method):
        raise ValueError(f"{method!r} is not a codec name")


class CalibrationShelf(ABC):
    """Calibration blobs of one layout by id, and the id each method encodes with now.

    Called from any thread without the cache lock (methods may do I/O). A
    shelf that cannot read or write logs why and answers None or False: a
    calibration that cannot be found makes its chunks misses, nothing worse.
    Blobs are checked by the reader (`CalibrationBook`), not here.
    """

    #: Where this shelf is, for log lines.
    where: str

    @abstractmethod
    def read(self, calibration_id: str) -> bytes | None:
        """The blob stored under `calibration_id`, or None."""

    @abstractmethod
    def write(self, calibration_id: str, blob: bytes) -> bool:
        """Store `blob` under `calibration_id` (kept as it is when already there)."""

    @abstractmethod
    def holds(self, calibration_id: str, size: int) -> bool:
        """Whether a blob of `size` bytes is stored under `calibration_id`, all of it (cheap:
        the blob is not read)."""

    @abstractmethod
    def current(self, method: str) -> str | None:
        """The id `method` encodes with on this layout, or None."""

    @abstractmethod
    def make_current(self, method: str, calibration_id: str) -> bool:
        """Record `calibration_id` as the one `method` encodes with from now on."""


class DiskShelf(CalibrationShelf):
    """Calibrations as files in one folder: `<id>.cal` and `<method>.current` (the id as text).

    Owns that folder, created on the first write. Every write goes to a
    temporary file that is flushed to disk and renamed into place, so a
    reader sees a whole file or none.
    """

    SUFFIX = ".cal"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.where = str(folder)

    def _path(self, calibration_id: str) -> Path:
        check_names(calibration_id=calibration_id)
        return self.folder / f"{calibration_id}{self.SUFFIX}"

    def read(self, calibration_id: str) -> bytes | None:
        try:
            return self._path(calibration_id).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            logger.error("cannot read calibration %s in %s: %s", calibration_id, self.where, e)
            return None

    def write(self, calibration_id: str, blob: bytes) -> bool:
        if self.holds(calibration_id, len(blob)):
            return True
        return self._replace(self._path(calibration_id), blob)

    def holds(self, calibration_id: str, size: int) -> bool:
        path = self._path(calibration_id)
        try:
            return path.stat().st_size == size
        except OSError:
            return False

    def current(self, method: str) -> str | None:
        check_names(method=method)
        try:
            text = (self.folder / f"{method}.current").read_text().strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            logger.error("cannot read the %s calibration in %s: %s", method, self.where, e)
            return None
        if not CALIBRATION_ID.match(text):
            logger.error("%s/%s.current does not name a calibration; ignored", self.where, method)
            return None
        return text

    def make_current(self, method: str, calibration_id: str) -> bool:
        check_names(method, calibration_id)
        return self._replace(self.folder / f"{method}.current", calibration_id.encode())

    def _replace(self, path: Path, data: bytes) -> bool:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            logger.error("cannot write %s: %s", path, e)
            return False
        return True
