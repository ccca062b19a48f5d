"""Counters of what went in and out of each tier of one worker's cache, for vLLM's metrics.

Counted where chunks cross a tier boundary, by the tier's name, so a new tier
needs no change here: the engine counts loads (from whichever tier answered)
and saves into the nearest tier, the CPU tier counts its spills into the next
one, and a write-through tier (a shared store) counts its own uploads and the
uploads it had to drop (`saved`, `save_dropped` on `TierContext.stats`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields


@dataclass(slots=True)
class TierCounts:
    """What crossed one tier's boundary since the last `CacheStats.take`."""

    load_tokens: int = 0
    #: Bytes as stored in the tier (the encoded size of a compressed chunk).
    load_bytes: int = 0
    save_tokens: int = 0
    save_bytes: int = 0
    #: Chunks the tier was handed to save but dropped (a full upload queue, a failed store).
    save_drops: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}


class CacheStats:
    """Owns the per-tier counters of one engine since the last `take`.

    Called from any thread that loads or saves (vLLM's worker thread, the
    agent's threads, a tier's background writer); `take` is called by the
    connector's worker half once per engine step. Never blocks beyond its own
    short lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tiers: dict[str, TierCounts] = {}

    def _of(self, tier: str) -> TierCounts:
        counts = self._tiers.get(tier)
        if counts is None:
            counts = self._tiers[tier] = TierCounts()
        return counts

    def loaded(self, tier: str, tokens: int, nbytes: int) -> None:
        """One chunk of `tokens` tokens (`nbytes` as stored) was read from `tier`."""
        with self._lock:
            counts = self._of(tier)
            counts.load_tokens += tokens
            counts.load_bytes += nbytes

    def saved(self, tier: str, tokens: int, nbytes: int) -> None:
        """One chunk of `tokens` tokens (`nbytes` as stored) was written into `tier`."""
        with self._lock:
            counts = self._of(tier)
            counts.save_tokens += tokens
            counts.save_bytes += nbytes

    def save_dropped(self, tier: str, chunks: int = 1) -> None:
        """`tier` gave up saving `chunks` chunks it was handed (they stay where they were)."""
        with self._lock:
            self._of(tier).save_drops += chunks

    def take(self) -> dict[str, TierCounts]:
        """The counters since the last call, per tier (tiers with nothing to report left out)."""
        with self._lock:
            taken, self._tiers = self._tiers, {}
        return taken
