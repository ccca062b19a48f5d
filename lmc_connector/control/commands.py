"""The controller's command thread: request/reply with workers, each with a deadline.

One thread owns every DEALER socket (one per worker address). Callers on
any thread get a `concurrent.futures.Future` that resolves to the worker's
`Reply`, or fails with `CommandTimeout` at its deadline; a dead or stopped
worker therefore costs its callers one timeout and nobody else anything.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError

import zmq

from lmc_connector.control import messages as m
from lmc_connector.control.transport import WakePipe, configure

logger = logging.getLogger(__name__)

#: Longest poll when nothing is due, so close() is noticed promptly.
IDLE_POLL_MS = 500


class CommandTimeout(TimeoutError):
    """The worker did not answer in time; treat it as unavailable (the op was not applied)."""


class CommandSendError(ConnectionError):
    """The command could not be sent (the worker's queue is full, or its address is not
    usable); treat the worker as unavailable."""


def _settle(future: Future[m.Reply], reply: m.Reply | None, error: Exception | None) -> None:
    try:
        if error is not None:
            future.set_exception(error)
        else:
            assert reply is not None
            future.set_result(reply)
    except InvalidStateError:
        pass  # the caller gave up (cancelled) first


class CommandLoop:
    def __init__(self, context: zmq.Context[zmq.Socket[bytes]]) -> None:
        self._context = context
        self._inbox: queue.SimpleQueue[tuple[str, bytes, int, float, Future[m.Reply]] | str] = (
            queue.SimpleQueue()
        )
        self._wake = WakePipe()
        self._ids = itertools.count(1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmc-commands", daemon=True)
        self._decoder = m.reply_decoder()

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.wake()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._wake.close()

    def request(
        self, address: str, build: Callable[[int], m.Command], timeout: float
    ) -> Future[m.Reply]:
        """Send `build(request_id)` to the worker at `address`; thread-safe."""
        future: Future[m.Reply] = Future()
        request_id = next(self._ids)
        payload = m.encode(build(request_id))
        self._inbox.put((address, payload, request_id, time.monotonic() + timeout, future))
        self._wake.wake()
        return future

    def forget(self, address: str) -> None:
        """Close the socket to a worker that is gone, dropping anything queued for it."""
        self._inbox.put(address)
        self._wake.wake()

    # -- the loop (command thread only) -----------------------------------------------------

    def _run(self) -> None:
        sockets: dict[str, zmq.Socket[bytes]] = {}
        pending: dict[int, Future[m.Reply]] = {}
        deadlines: list[tuple[float, int]] = []
        poller = zmq.Poller()
        poller.register(self._wake.fileno(), zmq.POLLIN)
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                wait_ms = IDLE_POLL_MS
                if deadlines:
                    wait_ms = max(0, min(wait_ms, int((deadlines[0][0] - now) * 1000) + 1))
                for item, _ in poller.poll(wait_ms):
                    if isinstance(item, zmq.Socket):
                        self._receive(item, pending)
                self._wake.drain()
                self._take_inbox(sockets, pending, deadlines, poller)
                self._expire(pending, deadlines)
        finally:
            for future in pending.values():
                _settle(future, None, CommandTimeout("controller shutting down"))
            for sock in sockets.values():
                sock.close(linger=0)

    def _take_inbox(
        self,
        sockets: dict[str, zmq.Socket[bytes]],
        pending: dict[int, Future[m.Reply]],
        deadlines: list[tuple[float, int]],
        poller: zmq.Poller,
    ) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, str):
                sock = sockets.pop(item, None)
                if sock is not None:
                    poller.unregister(sock)
                    sock.close(linger=0)
                continue
            address, payload, request_id, deadline, future = item
            sock = sockets.get(address)
            if sock is None:
                sock = self._context.socket(zmq.DEALER)
                configure(sock)
                try:
                    sock.connect(address)
                except zmq.ZMQError as e:
                    sock.close(linger=0)
                    _settle(future, None, CommandSendError(f"cannot connect to {address}: {e}"))
                    continue
                sockets[address] = sock
                poller.register(sock, zmq.POLLIN)
            try:
                sock.send(payload, zmq.NOBLOCK)
            except zmq.Again:
                _settle(future, None, CommandSendError(f"worker at {address} is not reading"))
                continue
            pending[request_id] = future
            heapq.heappush(deadlines, (deadline, request_id))

    def _receive(self, sock: zmq.Socket[bytes], pending: dict[int, Future[m.Reply]]) -> None:
        while True:
            try:
                data = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = self._decoder.decode(data)
            except m.MessageError as e:
                logger.warning("%s", e)
                continue
            future = pending.pop(reply.request_id, None)
            if future is not None:
                _settle(future, reply, None)

    def _expire(
        self, pending: dict[int, Future[m.Reply]], deadlines: list[tuple[float, int]]
    ) -> None:
        now = time.monotonic()
        while deadlines and deadlines[0][0] <= now:
            _, request_id = heapq.heappop(deadlines)
            future = pending.pop(request_id, None)
            if future is not None:
                _settle(future, None, CommandTimeout("no answer before the deadline"))
