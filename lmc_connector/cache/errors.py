"""Errors raised by the chunk cache; each message says what to do next."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from lmc_connector.ops.codecs.errors import MissingCalibrationError


class CacheError(ValueError):
    """A cache operation was asked for something the cache cannot do."""


class UnknownLocationError(CacheError):
    """The location names no tier of this worker; pick one of those listed."""

    def __init__(self, location: str, valid: Iterable[str]) -> None:
        names = sorted(valid)
        close = difflib.get_close_matches(location, names, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        super().__init__(
            f"unknown location '{location}'{hint}; this worker has: {', '.join(names)}"
        )
        self.location = location
        self.valid = names


class StoredMethodError(CacheError):
    """A decompress names a method none of the chunks was encoded with; use one listed."""

    def __init__(self, method: str, location: str, stored: dict[str, int]) -> None:
        listed = ", ".join(
            f"{name} ({count} chunk{'s' if count != 1 else ''})"
            for name, count in sorted(stored.items())
        )
        hint = next(iter(sorted(stored)))
        super().__init__(
            f"the chunks in {location} are stored with {listed}, not {method}: "
            f"decompress with method '{hint}'"
        )
        self.method = method
        self.stored = stored


class NotCalibratedError(MissingCalibrationError):
    """A compress with a calibrated codec before this worker has a calibration for its layout:
    calibrate first (`POST /calibrate`, `lmc-admin calibrate`), then compress."""

    def __init__(self, method: str) -> None:
        super().__init__(None)
        self.method = method
        self.args = (
            f"{method} needs a calibration for this worker's layout, and none was fitted yet: "
            f'calibrate first with POST /calibrate {{"instance_id": ..., "method": "{method}"}} '
            f"(or `lmc-admin calibrate --instance ID --method {method} --wait`), then compress",
        )


class NotEnoughKVError(CacheError):
    """A calibration was asked for before the worker cached enough KV to fit one: send more
    prompts (their KV is what it is fitted on), then calibrate again."""

    def __init__(self, method: str, needed: int, held: int) -> None:
        super().__init__(
            f"calibrating {method} needs at least {needed} cached tokens of this layout; this "
            f"worker holds {held}: send more prompts first, then calibrate again"
        )
        self.needed = needed
        self.held = held
