"""Errors raised by the chunk cache; each message says what to do next."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


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
