"""The calibrations one worker's cache encodes and decodes with, and where they are kept.

A calibration is fitted once per layout (`POST /calibrate`, see `calibrate.py`), then kept
in memory and on every shelf the tiers offer (the disk tier's folder, the shared store), so
that it survives a restart and other instances and peers of the layout decode the chunks
it encoded. Decoding looks for a blob's calibration in memory, then on the shelves nearest
first; one found farther away is copied onto the nearer shelves. Not found anywhere: the
chunk is a miss.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

from lmc_connector.cache.tiers.shelf import CalibrationShelf
from lmc_connector.ops.codecs import (
    Calibration,
    CalibrationStore,
    CodecError,
    calibration_id,
    codec_names,
    is_calibrated,
    parse_calibration,
)

logger = logging.getLogger(__name__)

#: Calibrations held in memory at once; beyond it the least recently loaded one that no
#: method encodes with is dropped (and read from a shelf again when a chunk needs it).
MAX_IN_MEMORY = 8
#: Seconds between checks that the shelves still hold a method's current calibration (the
#: shared store evicts, and one that was down missed the first write).
SHELF_CHECK_S = 60.0


def calibrated_methods() -> list[str]:
    """The registered codecs that need a calibration."""
    return [name for name in codec_names() if is_calibrated(name)]


class CalibrationBook:
    """Owns the parsed calibrations in memory (`store`, bounded), the shelves of the tiers
    that keep them (nearest first) and the id each calibrated method encodes with now.

    Built by the engine, opened after its tiers; then used from any thread: vLLM's load
    path and the agent's jobs decode through `store`, jobs encode with `current`, the
    calibration job calls `adopt`. Shelf I/O runs without the cache lock.
    """

    def __init__(self) -> None:
        self.store = CalibrationStore(loader=self._load)
        self._shelves: list[CalibrationShelf] = []
        self._lock = threading.Lock()
        self._current: dict[str, str] = {}
        #: Ids in memory, least recently added first (what MAX_IN_MEMORY drops first).
        self._held: OrderedDict[str, None] = OrderedDict()
        #: Method -> when `keep_on_shelves` looks at its shelves again.
        self._next_check: dict[str, float] = {}

    def attach(self, shelves: Sequence[CalibrationShelf]) -> None:
        """The shelves to keep calibrations on, nearest first (before `open`)."""
        self._shelves = list(shelves)

    def open(self) -> None:
        """Take each calibrated method's current calibration from the nearest shelf that
        names one and holds it (what an earlier run, or another instance, fitted)."""
        for method in calibrated_methods():
            for shelf in self._shelves:
                found = shelf.current(method)
                if found is None:
                    continue
                if self.store.get(found) is not None:
                    with self._lock:
                        self._current[method] = found
                    logger.info("%s calibration %s loaded from %s", method, found, shelf.where)
                    break
                logger.warning(
                    "%s names %s calibration %s, which cannot be read; looking further",
                    shelf.where,
                    method,
                    found,
                )

    def current(self, method: str) -> Calibration | None:
        """The calibration `method` encodes with on this layout, or None before one exists."""
        with self._lock:
            found = self._current.get(method)
        return None if found is None else self.store.get(found)

    def current_ids(self) -> dict[str, str]:
        """Method -> id of the calibration it encodes with."""
        with self._lock:
            return dict(self._current)

    def adopt(self, method: str, blob: bytes) -> Calibration:
        """Keep a freshly fitted calibration of `method` in memory and on every shelf, and
        encode with it from now on; returns it parsed. A shelf that fails is logged: the
        calibration still serves this process."""
        calibration = parse_calibration(blob)
        self._hold(calibration.id)
        self.store.add(calibration)
        kept = [
            shelf.where for shelf in self._shelves if _shelve(shelf, method, calibration.id, blob)
        ]
        with self._lock:
            self._current[method] = calibration.id
        logger.info(
            "%s calibration %s (%d bytes) adopted; kept in memory%s",
            method,
            calibration.id,
            len(blob),
            "".join(f", {where}" for where in kept),
        )
        return calibration

    def keep_on_shelves(self, method: str) -> None:
        """Write `method`'s current calibration again onto every shelf that lost it, at most
        once per SHELF_CHECK_S: chunks encoded with it keep decoding on every instance.
        Called by whoever encodes with it for a shared tier."""
        now = time.monotonic()
        with self._lock:
            wanted = self._current.get(method)
            if wanted is None or now < self._next_check.get(method, 0.0):
                return
            self._next_check[method] = now + SHELF_CHECK_S
        calibration = self.store.get(wanted)
        if calibration is None:
            return
        for shelf in self._shelves:
            if shelf.holds(wanted, len(calibration.blob)):
                continue
            if _shelve(shelf, method, wanted, calibration.blob):
                logger.warning(
                    "%s calibration %s was missing from %s; written there again",
                    method,
                    wanted,
                    shelf.where,
                )

    def _load(self, wanted: str) -> bytes | None:
        """The CalibrationStore's loader: the blob of `wanted` from the nearest shelf that
        holds a valid copy, copied onto the shelves before it."""
        for depth, shelf in enumerate(self._shelves):
            try:
                blob = shelf.read(wanted)
            except ValueError:  # not an id: nothing to look up
                return None
            if blob is None:
                continue
            try:
                valid = calibration_id(blob) == wanted
            except CodecError:
                valid = False
            if not valid:
                logger.error("%s holds a damaged copy of calibration %s", shelf.where, wanted)
                continue
            for nearer in self._shelves[:depth]:
                nearer.write(wanted, blob)
            self._hold(wanted)
            return blob
        return None

    def _hold(self, adding: str) -> None:
        """Make room in memory for `adding` (never dropping one a method encodes with)."""
        with self._lock:
            self._held[adding] = None
            self._held.move_to_end(adding)
            keep = set(self._current.values()) | {adding}
            spare = [i for i in self._held if i not in keep]
            drop = spare[: max(0, len(self._held) - MAX_IN_MEMORY)]
            for old in drop:
                del self._held[old]
        for old in drop:
            self.store.remove(old)


def _shelve(shelf: CalibrationShelf, method: str, calibration_id: str, blob: bytes) -> bool:
    """Put a calibration on `shelf` as the one `method` encodes with; whether both landed."""
    return shelf.write(calibration_id, blob) and shelf.make_current(method, calibration_id)
