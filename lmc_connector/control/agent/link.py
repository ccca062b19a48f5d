"""Whether a worker's PUSH socket reaches the controller, said in the worker's log.

A PUSH socket queues messages while nobody listens, so without this a worker
whose `controller_pull_url` is wrong (or whose controller is down) would
believe it registered and say nothing. ZeroMQ's socket monitor reports the
connection's ups and downs; this logs them, and warns while the controller
stays unreachable. The connection counts once its handshake succeeded: a
controller that refuses the handshake (another secret, or a secret on one
side only) is warned about as such.
"""

from __future__ import annotations

import logging
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from lmc_connector.throttle import Throttle

logger = logging.getLogger(__name__)

#: Seconds without a connection before the first warning, and between two warnings.
UNREACHABLE_WARN_S = 10.0
REPEAT_WARN_S = 60.0
#: Handshake outcomes count, not bare TCP connections (a refused handshake connects first).
HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILED


class ControllerLink:
    """Owns the monitor socket of one PUSH socket (created before it connects) and what it
    last said about the connection. Used by the reporter thread only, after `__init__`."""

    def __init__(self, push: zmq.Socket[bytes], url: str, who: str) -> None:
        self.socket: zmq.Socket[bytes] = push.get_monitor_socket(EVENTS)
        self._push = push
        self._url = url
        self._who = who
        self.connected = False
        #: The controller answered but refused the handshake (since the last success).
        self.refused = False
        self._since = time.monotonic()
        self._warnings = Throttle(REPEAT_WARN_S)

    def drain(self) -> bool:
        """Read the monitor's events and log each loss of the connection; True when the
        connection has just come (up again)."""
        came = False
        while self.socket.poll(0):
            event = recv_monitor_message(self.socket)["event"]
            if event & HANDSHAKE_FAILED:
                self.refused = True
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED and not self.connected:
                self.connected = came = True
                self.refused = False
            elif event == zmq.EVENT_DISCONNECTED and self.connected:
                self.connected = False
                self._since = time.monotonic()
                logger.warning(
                    "%s: lost the controller at %s; serving on, registering again when it answers",
                    self._who,
                    self._url,
                )
        return came

    def check(self, now: float) -> None:
        """Warn (throttled) while the controller has been unreachable for a while."""
        down = now - self._since
        if self.connected or down < UNREACHABLE_WARN_S or not self._warnings.ready():
            return
        if self.refused:
            logger.warning(
                "%s: the controller at %s refuses this worker's handshake for %.0f s: "
                "control_secret_file must hold the secret of the controller's --secret-file "
                "(or neither side has one); the worker serves on and registers once it may",
                self._who,
                self._url,
                down,
            )
            return
        logger.warning(
            "%s: the controller at %s has not answered for %.0f s: check that "
            "controller_pull_url names the controller's --monitor-port and that it runs; "
            "the worker serves on and registers once it answers",
            self._who,
            self._url,
            down,
        )

    def close(self) -> None:
        self._push.disable_monitor()
        self.socket.close(linger=0)
