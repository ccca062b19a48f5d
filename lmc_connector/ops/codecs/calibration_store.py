"""Calibrations by id, for decoding blobs of calibrated codecs (see registry.decode_blob)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

from lmc_connector.ops.codecs.calibration import Calibration, parse_calibration
from lmc_connector.ops.codecs.errors import CodecError


class CalibrationSource(Protocol):
    """Anything that maps a calibration id to a calibration or its blob, or None: a
    CalibrationStore, or a plain dict."""

    def get(self, calibration_id: str, /) -> Calibration | bytes | None: ...


class CalibrationStore:
    """The calibrations one process can decode with, parsed once, keyed by id.

    Owns parsed Calibration objects (and so their per-device weights). Any thread may call
    any method. On a miss, `loader(calibration_id)` (when given) is asked for the blob, e.g.
    from the disk tier or the shared store where the serving path keeps one calibration per
    layout; what it returns is validated and must hash to the id it was asked for.
    """

    def __init__(self, loader: Callable[[str], bytes | None] | None = None) -> None:
        self._loader = loader
        self._lock = threading.Lock()
        self._by_id: dict[str, Calibration] = {}

    def add(self, calibration: Calibration | bytes) -> Calibration:
        """Validate (if bytes) and keep `calibration`; returns the parsed object."""
        cal = (
            calibration if isinstance(calibration, Calibration) else parse_calibration(calibration)
        )
        with self._lock:
            return self._by_id.setdefault(cal.id, cal)

    def get(self, calibration_id: str, /) -> Calibration | None:
        """The calibration named `calibration_id`, asking the loader on a miss; None when
        nobody has it."""
        with self._lock:
            found = self._by_id.get(calibration_id)
        if found is not None or self._loader is None:
            return found
        blob = self._loader(calibration_id)
        if blob is None:
            return None
        return self.add(resolve(blob, calibration_id))

    def remove(self, calibration_id: str) -> None:
        with self._lock:
            self._by_id.pop(calibration_id, None)

    def ids(self) -> list[str]:
        with self._lock:
            return sorted(self._by_id)

    def __contains__(self, calibration_id: object) -> bool:
        with self._lock:
            return calibration_id in self._by_id

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_id)


def resolve(found: Calibration | bytes, calibration_id: str) -> Calibration:
    """`found` parsed, checked to be the calibration named `calibration_id`."""
    cal = found if isinstance(found, Calibration) else parse_calibration(found)
    if cal.id != calibration_id:
        raise CodecError(f"calibration {cal.id} was given for id {calibration_id}")
    return cal
