"""The thread both ends of the transport run: a loop woken through a pipe, stopped once."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod

from lmc_connector.control.wire.sockets import WakePipe

#: Seconds `close` waits for the thread to end.
JOIN_TIMEOUT_S = 5.0


class SocketThread(ABC):
    """Owns one daemon thread running `_run`, its stop flag and the pipe that wakes it.

    Subclasses own the sockets; `_run` polls them and the pipe until the flag
    is set. Construct, `start` the thread, `close` (idempotent).
    """

    def __init__(self, name: str) -> None:
        self._wake = WakePipe()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lmc-{name}", daemon=True)

    @abstractmethod
    def _run(self) -> None: ...

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        """Stop the thread and close the socket(s); a second call does nothing."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake.wake()
        if self._thread.is_alive():
            self._thread.join(timeout=JOIN_TIMEOUT_S)
        self._wake.close()
