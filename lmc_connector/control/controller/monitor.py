"""The controller's monitor thread: the PULL socket workers push to, plus liveness checks.

One thread owns the PULL socket. Every message is decoded with one typed
decoder; a malformed one is counted and logged (rate-limited) and the loop
goes on. What the state answers (registration acknowledgments and refusals,
resync requests) and workers that are gone (silent, deregistered, or
re-registered at another address) are handed to callbacks (the command
client), never sent from this thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import zmq

from lmc_connector.control.controller.state import ControllerState, Notice, WorkerRef
from lmc_connector.control.wire import commands as cmd
from lmc_connector.control.wire import monitor as mon
from lmc_connector.control.wire.codec import MessageError
from lmc_connector.control.wire.security import ChannelSecurity
from lmc_connector.throttle import Throttle

logger = logging.getLogger(__name__)

#: Poll timeout: bounds how late close() and the liveness check are noticed.
POLL_MS = 100
#: Messages drained per wake-up before looking at liveness again.
DRAIN_BATCH = 256
#: At most one malformed-message warning per this many seconds.
MALFORMED_LOG_EVERY_S = 5.0
#: Messages queued in the PULL socket before workers' sends fail (they then resync later).
RCVHWM = 100_000


class MonitorLoop:
    """Owns the PULL socket and the thread that drains it into the controller's state.

    `security` authenticates the workers pushing to it. Construct, `start`
    (binds: a taken port or an insecure address raises in the caller), `close`.
    """

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        state: ControllerState,
        bind_url: str,
        security: ChannelSecurity,
        on_notice: Callable[[Notice], None],
        on_gone: Callable[[WorkerRef], None],
    ) -> None:
        self._context = context
        self._state = state
        self._bind_url = bind_url
        self._security = security
        self._on_notice = on_notice
        self._on_gone = on_gone
        self._decoder = mon.worker_message_decoder()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmc-monitor", daemon=True)
        self._sock: zmq.Socket[bytes] | None = None
        self._malformed_log = Throttle(MALFORMED_LOG_EVERY_S)
        self._failed_log = Throttle(MALFORMED_LOG_EVERY_S)
        self._resync_log = Throttle(MALFORMED_LOG_EVERY_S)
        self._resyncs = 0

    def start(self) -> None:
        """Bind now (so a taken port fails here, in the caller) and start the thread."""
        self._sock = self._security.listen(self._context, zmq.PULL, self._bind_url, RCVHWM)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        sock = self._sock
        assert sock is not None
        state = self._state
        next_check = 0.0
        try:
            while not self._stop.is_set():
                if sock.poll(POLL_MS):
                    for _ in range(DRAIN_BATCH):
                        try:
                            data = sock.recv(zmq.NOBLOCK, copy=True)
                        except zmq.Again:
                            break
                        self._ingest(data)
                now = time.monotonic()
                if now >= next_check:
                    next_check = now + min(1.0, state.worker_timeout / 4)
                    state.expire(now)
                for ref in state.take_departed():
                    self._on_gone(ref)
        finally:
            sock.close()

    def _ingest(self, data: bytes) -> None:
        try:
            msg = self._decoder.decode(data)
        except MessageError as e:
            self._state.stats.malformed += 1
            if self._malformed_log.ready():
                logger.warning("%s (dropped; %d so far)", e, self._state.stats.malformed)
            return
        try:
            notice = self._state.handle(msg)
        except Exception:  # boundary: this message is lost (a bug); the monitor serves on
            self._state.stats.failed += 1
            if self._failed_log.ready():
                logger.exception("a %s message could not be applied", type(msg).__name__)
            return
        if notice is None:
            return
        ref, command = notice
        if isinstance(command, cmd.Resync):
            self._resyncs += 1
            if self._resync_log.ready():
                logger.info(
                    "unknown worker %s/%d at %s: asking it to resync (%d asked so far)",
                    ref.instance_id[:80],
                    ref.rank,
                    ref.address,
                    self._resyncs,
                )
        self._on_notice(notice)
