"""The client side of the request/reply transport: one thread, one DEALER per server."""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import time
from collections import OrderedDict
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

import zmq

from lmc_connector.control.wire.rpc.envelope import (
    IDLE_POLL_MS,
    MAX_QUEUED,
    NOTIFY,
    REQUEST_ID,
    WARN_EVERY_S,
    Payload,
    RpcError,
    RpcSendError,
    RpcTimeout,
)
from lmc_connector.control.wire.rpc.loop import SocketThread
from lmc_connector.control.wire.security import ChannelSecurity
from lmc_connector.throttle import Throttle

logger = logging.getLogger(__name__)

#: DEALER sockets a client keeps open. The least recently used idle ones are closed beyond
#: this (after flushing what they queued, for at most `EVICTED_LINGER_MS`), so a fleet of
#: thousands of servers costs descriptors only for those in use.
MAX_OPEN_SOCKETS = 256
#: Milliseconds a socket closed for room may still flush its queue: long enough for a
#: connection to a fresh address to be set up on a busy host (200 ms lost some).
EVICTED_LINGER_MS = 1000
#: ZMQ sockets one client's context may hold: the open ones, those still flushing after
#: close, and the servers' of the same context.
CONTEXT_MAX_SOCKETS = 8192


def _settle(future: Future[list[zmq.Frame]], result: list[zmq.Frame] | RpcError) -> None:
    try:
        if isinstance(result, RpcError):
            future.set_exception(result)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass  # the caller gave up (cancelled) first


@dataclass(slots=True)
class _Outgoing:
    address: str
    frames: list[bytes | memoryview]
    request_id: int
    deadline: float
    future: Future[list[zmq.Frame]] | None


class RpcClient(SocketThread):
    """Sends requests to any number of servers and matches their answers.

    Owns one thread and its DEALER sockets (one per server address, at most
    `MAX_OPEN_SOCKETS` open), the requests in flight and their deadlines.
    `security` authenticates it to the servers (see `security.ChannelSecurity`).
    Construct, `start`, use from any thread, `close`.
    """

    def __init__(
        self, context: zmq.Context[zmq.Socket[bytes]], name: str, security: ChannelSecurity
    ) -> None:
        super().__init__(name)
        self._context = context
        self._name = name
        self._security = security
        if context.get(zmq.MAX_SOCKETS) < CONTEXT_MAX_SOCKETS:
            context.set(zmq.MAX_SOCKETS, CONTEXT_MAX_SOCKETS)
        self._inbox: queue.Queue[_Outgoing | str] = queue.Queue(MAX_QUEUED)
        self._ids = itertools.count(1)
        self._sockets: OrderedDict[str, zmq.Socket[bytes]] = OrderedDict()
        self._in_flight: dict[str, int] = {}
        self._pending: dict[int, tuple[str, Future[list[zmq.Frame]]]] = {}
        self._deadlines: list[tuple[float, int]] = []
        self._poller = zmq.Poller()
        self._bad_frames = Throttle(WARN_EVERY_S)
        self._socket_errors = Throttle(WARN_EVERY_S)

    def start(self) -> None:
        self._poller.register(self._wake.fileno(), zmq.POLLIN)
        self._thread.start()

    @property
    def open_sockets(self) -> int:
        """Servers this client holds a socket to now (read from any thread, approximate)."""
        return len(self._sockets)

    def request(self, address: str, frames: Payload, timeout: float) -> Future[list[zmq.Frame]]:
        """Send `frames` to the server at `address`; the future resolves to its reply frames
        or fails with `RpcTimeout` / `RpcSendError`. Thread-safe."""
        future: Future[list[zmq.Frame]] = Future()
        deadline = time.monotonic() + timeout
        self._enqueue(_Outgoing(address, list(frames), next(self._ids), deadline, future))
        return future

    def call(self, address: str, frames: Payload, timeout: float) -> list[zmq.Frame]:
        """`request` and wait for the answer (raises `RpcTimeout` / `RpcSendError`)."""
        try:
            return self.request(address, frames, timeout).result(timeout + 1.0)
        except TimeoutError as e:
            raise RpcTimeout(f"{address}: no answer within {timeout:g} s") from e

    def notify(self, address: str, frames: Payload) -> None:
        """Send `frames` expecting no answer; dropped if the server is not reading."""
        self._enqueue(_Outgoing(address, list(frames), NOTIFY, 0.0, None))

    def forget(self, address: str) -> None:
        """Close the socket to a server that is gone; its requests in flight time out."""
        self._enqueue(address)

    def _enqueue(self, item: _Outgoing | str) -> None:
        try:
            self._inbox.put_nowait(item)
        except queue.Full:
            if isinstance(item, _Outgoing) and item.future is not None:
                _settle(item.future, RpcSendError(f"{self._name}: too many requests queued"))
            return
        self._wake.wake()

    # -- the client thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._step()
                except zmq.ZMQError as e:
                    if e.errno == zmq.ETERM:
                        return
                    # Boundary: one socket failed (e.g. out of descriptors); its requests time
                    # out by their deadlines and the thread serves on.
                    if self._socket_errors.ready():
                        logger.exception("%s: socket error; serving on", self._name)
        finally:
            for _, future in self._pending.values():
                _settle(future, RpcTimeout(f"{self._name}: shutting down"))
            for sock in self._sockets.values():
                sock.close(linger=0)

    def _step(self) -> None:
        wait_ms = IDLE_POLL_MS
        if self._deadlines:
            due = int((self._deadlines[0][0] - time.monotonic()) * 1000) + 1
            wait_ms = max(0, min(wait_ms, due))
        for item, _ in self._poller.poll(wait_ms):
            if isinstance(item, zmq.Socket):
                self._receive(item)
        self._wake.drain()
        self._take_inbox()
        self._expire()

    def _take_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, str):
                self._close_socket(item, linger=0)
            else:
                self._send(item)

    def _send(self, out: _Outgoing) -> None:
        sock = self._socket(out.address)
        if isinstance(sock, RpcSendError):
            if out.future is not None:
                _settle(out.future, sock)
            return
        try:
            sock.send_multipart([REQUEST_ID.pack(out.request_id), *out.frames], zmq.NOBLOCK)
        except zmq.Again:
            if out.future is not None:
                _settle(out.future, RpcSendError(f"server at {out.address} is not reading"))
            return
        except zmq.ZMQError as e:
            if out.future is not None:
                _settle(out.future, RpcSendError(f"cannot send to {out.address}: {e}"))
            return
        if out.future is not None:
            self._pending[out.request_id] = (out.address, out.future)
            self._in_flight[out.address] = self._in_flight.get(out.address, 0) + 1
            heapq.heappush(self._deadlines, (out.deadline, out.request_id))

    def _socket(self, address: str) -> zmq.Socket[bytes] | RpcSendError:
        sock = self._sockets.get(address)
        if sock is not None:
            self._sockets.move_to_end(address)
            return sock
        if len(self._sockets) >= MAX_OPEN_SOCKETS:
            idle = next((a for a in self._sockets if not self._in_flight.get(a)), None)
            if idle is not None:
                self._close_socket(idle, linger=EVICTED_LINGER_MS)
        try:
            sock = self._security.dial(self._context, zmq.DEALER, address)
        except zmq.ZMQError as e:
            return RpcSendError(f"cannot connect to {address}: {e}")
        self._sockets[address] = sock
        self._poller.register(sock, zmq.POLLIN)
        return sock

    def _close_socket(self, address: str, linger: int) -> None:
        sock = self._sockets.pop(address, None)
        if sock is not None:
            self._poller.unregister(sock)
            sock.close(linger=linger)

    def _receive(self, sock: zmq.Socket[bytes]) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) < 2 or len(frames[0].bytes) != REQUEST_ID.size:
                if self._bad_frames.ready():
                    logger.warning("%s: dropped a reply of %d frames", self._name, len(frames))
                continue
            (request_id,) = REQUEST_ID.unpack(frames[0].bytes)
            entry = self._pending.pop(request_id, None)
            if entry is not None:
                self._done(entry[0])
                _settle(entry[1], frames[1:])

    def _expire(self) -> None:
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, request_id = heapq.heappop(self._deadlines)
            entry = self._pending.pop(request_id, None)
            if entry is not None:
                self._done(entry[0])
                _settle(entry[1], RpcTimeout(f"{entry[0]}: no answer before the deadline"))

    def _done(self, address: str) -> None:
        left = self._in_flight.get(address, 1) - 1
        if left > 0:
            self._in_flight[address] = left
        else:
            self._in_flight.pop(address, None)
