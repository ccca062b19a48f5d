"""Rate limits for log lines that a peer, a store or a busy path could repeat at will."""

from __future__ import annotations

import time


class Throttle:
    """Says yes at most once per `every_s` seconds: for warnings a peer can trigger at will."""

    def __init__(self, every_s: float) -> None:
        self._every_s = every_s
        self._last = float("-inf")
        self.suppressed = 0

    def ready(self) -> bool:
        now = time.monotonic()
        if now - self._last < self._every_s:
            self.suppressed += 1
            return False
        self._last = now
        return True
