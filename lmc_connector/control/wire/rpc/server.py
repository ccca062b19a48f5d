"""The server side of the request/reply transport: one thread owning one ROUTER."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import zmq

from lmc_connector.control.wire.rpc.envelope import (
    IDLE_POLL_MS,
    MAX_QUEUED,
    NOTIFY,
    REQUEST_ID,
    WARN_EVERY_S,
    Payload,
)
from lmc_connector.control.wire.rpc.loop import SocketThread
from lmc_connector.control.wire.security import ChannelSecurity
from lmc_connector.throttle import Throttle

logger = logging.getLogger(__name__)


class Call:
    """One request as a server received it; answer it once with `reply`, from any thread."""

    __slots__ = ("_server", "frames", "identity", "request_id")

    def __init__(
        self, server: RpcServer, identity: bytes, request_id: bytes, frames: list[zmq.Frame]
    ) -> None:
        self._server = server
        self.identity = identity
        self.request_id = request_id
        self.frames = frames

    @property
    def wants_reply(self) -> bool:
        return REQUEST_ID.unpack(self.request_id)[0] != NOTIFY

    def reply(self, frames: Payload) -> None:
        if self.wants_reply:
            self._server.send([self.identity, self.request_id, *frames])


class RpcServer(SocketThread):
    """Answers requests arriving on one ROUTER socket.

    Owns one thread and the socket. `handler(call)` runs on that thread for
    every well-formed request; it answers at once (`call.reply`) or hands the
    call to another thread that answers later. A request never answered times
    out at its client. `security` authenticates its clients (see
    `security.ChannelSecurity`). Construct, `start` (binds, or raises
    `zmq.ZMQError` / `InsecureBindError`), `close`.
    """

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        bind_url: str,
        handler: Callable[[Call], None],
        name: str,
        security: ChannelSecurity,
    ) -> None:
        super().__init__(name)
        self._context = context
        self._security = security
        self.bind_url = bind_url
        self._handler = handler
        self._name = name
        self._outbox: queue.Queue[list[bytes | memoryview]] = queue.Queue(MAX_QUEUED)
        self._sock: zmq.Socket[bytes] | None = None
        self._bad_frames = Throttle(WARN_EVERY_S)
        #: Requests that arrived with a malformed envelope (counted, never answered).
        self.malformed = 0

    @property
    def endpoint(self) -> str:
        """The bound address (with the real port when bound to port 0)."""
        assert self._sock is not None, "start() first"
        return str(self._sock.getsockopt_string(zmq.LAST_ENDPOINT))

    def start(self) -> None:
        self._sock = self._security.listen(self._context, zmq.ROUTER, self.bind_url)
        self._thread.start()

    def send(self, frames: list[bytes | memoryview]) -> None:
        """Queue a reply for the server thread (sent directly when called on it)."""
        if threading.current_thread() is self._thread and self._sock is not None:
            self._send_now(self._sock, frames)
            return
        try:
            self._outbox.put_nowait(frames)
        except queue.Full:
            logger.warning("%s: reply dropped, too many queued", self._name)
            return
        self._wake.wake()

    def _run(self) -> None:
        sock = self._sock
        assert sock is not None
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake.fileno(), zmq.POLLIN)
        try:
            while not self._stop.is_set():
                for item, _ in poller.poll(IDLE_POLL_MS):
                    if item is sock:
                        self._receive(sock)
                self._wake.drain()
                self._flush(sock)
        finally:
            sock.close(linger=0)

    def _receive(self, sock: zmq.Socket[bytes]) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) < 3 or len(frames[1].bytes) != REQUEST_ID.size:
                self.malformed += 1
                if self._bad_frames.ready():
                    logger.warning(
                        "%s: dropped a request of %d frames (%d malformed so far)",
                        self._name,
                        len(frames),
                        self.malformed,
                    )
                continue
            call = Call(self, frames[0].bytes, frames[1].bytes, frames[2:])
            try:
                self._handler(call)
            except Exception:  # boundary: one request fails (its client times out); serve on
                logger.exception("%s: a request handler failed", self._name)

    def _flush(self, sock: zmq.Socket[bytes]) -> None:
        while True:
            try:
                frames = self._outbox.get_nowait()
            except queue.Empty:
                return
            self._send_now(sock, frames)

    def _send_now(self, sock: zmq.Socket[bytes], frames: list[bytes | memoryview]) -> None:
        try:
            # copy=False: large frames (chunk bytes) go out without a copy, the frame holding a
            # reference to its buffer until sent; pyzmq still copies small ones.
            sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            logger.warning("%s: reply dropped, the client is not reading", self._name)
        except zmq.ZMQError as e:  # e.g. the client is gone (EHOSTUNREACH with ROUTER_MANDATORY)
            logger.debug("%s: reply not sent: %s", self._name, e)
