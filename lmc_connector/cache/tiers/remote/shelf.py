"""Calibrations in the shared store, so that every instance and peer of a layout decodes.

    lmc:<fingerprint>:calibration:{<id>}       "<pieces> <bytes>": written last, read first
    lmc:<fingerprint>:calibration:{<id>}:<i>   the blob, in pieces of PIECE_BYTES
    lmc:<fingerprint>:calibration:<method>     the id that method encodes with on this layout

Outside the chunk names (`keys.py`): clearing a layout's chunks leaves them. The braces keep
one calibration's names in one Redis Cluster hash slot.
"""

from __future__ import annotations

from typing import Any

from typing_extensions import override

from lmc_connector.cache.tiers.remote.client import Client, StoreSession
from lmc_connector.cache.tiers.remote.keys import piece_names
from lmc_connector.cache.tiers.remote.values import PIECE_BYTES, pieces_for
from lmc_connector.cache.tiers.shelf import CALIBRATION_ID, CalibrationShelf, check_names

#: Largest calibration the store is asked for (a large model's is a few hundred MB).
MAX_CALIBRATION_BYTES = 2 << 30


class StoreShelf(CalibrationShelf):
    """The shared store's calibrations of one layout, through the store tier's session
    (its clients, timeouts and health: a store that is down reads as absent)."""

    def __init__(self, session: StoreSession, namespace: str) -> None:
        self._session = session
        self._prefix = f"{namespace}calibration:"
        self.where = f"the shared store ({self._prefix}*)"

    def _head(self, calibration_id: str) -> str:
        check_names(calibration_id=calibration_id)
        return f"{self._prefix}{{{calibration_id}}}"

    @override
    def read(self, calibration_id: str) -> bytes | None:
        head = self._head(calibration_id)

        def fetch(client: Client) -> bytes | None:
            described = client.get(head)
            if described is None:
                return None
            count, size = _parse_head(described)
            if count == 0:
                return None  # not a calibration head
            pipe = client.pipeline(transaction=False)
            for name in piece_names(head, count):
                pipe.get(name)
            pieces = pipe.execute()
            if any(not isinstance(p, bytes) for p in pieces):
                return None  # a piece was evicted: the calibration is gone
            blob = b"".join(pieces)
            return blob if len(blob) == size else None

        found: bytes | None = self._session.call("read a calibration", True, fetch)
        return found

    @override
    def write(self, calibration_id: str, blob: bytes) -> bool:
        head = self._head(calibration_id)
        count = pieces_for(len(blob))
        view = memoryview(blob)

        def store(client: Client) -> bool:
            pipe = client.pipeline(transaction=False)
            for i, name in enumerate(piece_names(head, count)):
                pipe.set(name, view[i * PIECE_BYTES : (i + 1) * PIECE_BYTES])
            pipe.set(head, f"{count} {len(blob)}")
            pipe.execute()
            return True

        return bool(self._session.call("write a calibration", True, store))

    @override
    def holds(self, calibration_id: str, size: int) -> bool:
        head = self._head(calibration_id)
        names = [head, *piece_names(head, pieces_for(size))]
        found = self._session.call(
            "look for a calibration", True, lambda c: c.exists(*names) == len(names)
        )
        return bool(found)

    @override
    def current(self, method: str) -> str | None:
        check_names(method=method)
        name = f"{self._prefix}{method}"
        found = self._session.call("read the current calibration", True, lambda c: c.get(name))
        if not isinstance(found, bytes):
            return None
        text = found.decode(errors="replace")
        return text if CALIBRATION_ID.match(text) else None

    @override
    def make_current(self, method: str, calibration_id: str) -> bool:
        check_names(method, calibration_id)
        name = f"{self._prefix}{method}"
        done = self._session.call(
            "record the current calibration", True, lambda c: c.set(name, calibration_id)
        )
        return bool(done)


def _parse_head(described: Any) -> tuple[int, int]:
    """(pieces, bytes) of a head; (0, 0) for anything else."""
    try:
        count, size = (int(part) for part in bytes(described).split())
    except (TypeError, ValueError):
        return 0, 0
    if not 0 < size <= MAX_CALIBRATION_BYTES or count != pieces_for(size):
        return 0, 0
    return count, size
