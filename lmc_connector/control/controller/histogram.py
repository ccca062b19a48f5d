"""Bucketed histograms keyed by operation kind, for the controller's metrics."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence

#: Seconds, from sub-millisecond command round trips to long compress jobs.
SECONDS_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)


class KindHistogram:
    """Owns observation counts per bucket and their sum, per kind; any thread observes.

    Kinds are operation kinds (a handful), so the table stays small.
    """

    def __init__(self, buckets: Sequence[float] = SECONDS_BUCKETS) -> None:
        self.buckets = tuple(buckets)
        self._lock = threading.Lock()
        self._data: dict[str, tuple[list[int], list[float]]] = {}

    def observe(self, kind: str, value: float) -> None:
        with self._lock:
            counts, total = self._data.setdefault(kind, ([0] * (len(self.buckets) + 1), [0.0]))
            counts[bisect.bisect_left(self.buckets, value)] += 1
            total[0] += value

    def snapshot(self) -> dict[str, tuple[list[tuple[str, float]], float]]:
        """Per kind: cumulative (upper bound, count) pairs ending with "+Inf", and the sum."""
        out: dict[str, tuple[list[tuple[str, float]], float]] = {}
        with self._lock:
            for kind, (counts, total) in sorted(self._data.items()):
                running = 0
                pairs: list[tuple[str, float]] = []
                for bound, count in zip((*self.buckets, float("inf")), counts, strict=True):
                    running += count
                    pairs.append(("+Inf" if bound == float("inf") else repr(bound), running))
                out[kind] = (pairs, total[0])
        return out
