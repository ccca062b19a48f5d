"""ZMQ settings and small helpers shared by every channel.

Threading model: every socket is created, used and closed by one thread (the
thread that owns the loop it belongs to). Other threads hand work to that
thread through a queue and wake it through a `WakePipe`, whose file
descriptor the owning thread polls beside its sockets. Every socket is made
by `new_socket`, so every channel gets the same options; the sockets of
channels are made through a `security.ChannelSecurity` (`listen` / `dial`),
which adds the channel's authentication on top.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time

import zmq

#: Messages queued per peer before a send fails with zmq.Again instead of blocking:
#: a peer that stops reading must never stall the sender's loop.
SNDHWM = 10_000
#: Milliseconds a closing socket may keep flushing; the default (-1) makes
#: Context.term() hang forever when a peer is gone.
LINGER_MS = 200
#: Largest message accepted; a full snapshot of 1M chunk keys is ~9 MB.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def resolve_host(host: str) -> str:
    """An IPv4 address ZMQ can bind or connect to ("localhost" -> "127.0.0.1")."""
    if host in ("*", "0.0.0.0"):
        return "0.0.0.0"
    try:
        return socket.gethostbyname(host)
    except OSError as e:
        raise ValueError(f"cannot resolve host '{host}': {e}") from e


def tcp_url(host: str, port: int) -> str:
    return f"tcp://{resolve_host(host)}:{port}"


def parse_host_port(text: str, what: str) -> tuple[str, int]:
    """Split "host:port" (a `tcp://` prefix is allowed); ValueError names `what` on a mistake."""
    body = text.removeprefix("tcp://")
    host, sep, port_text = body.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{what}={text!r} is not host:port (e.g. localhost:9001)")
    return host, int(port_text)


def new_socket(context: zmq.Context[zmq.Socket[bytes]], kind: int) -> zmq.Socket[bytes]:
    """A socket of `kind` with the options every channel gets."""
    sock = context.socket(kind)
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.setsockopt(zmq.SNDHWM, SNDHWM)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    return sock


class RateLimit:
    """A token bucket: `take` says yes at most `rate` times per second on average, `burst` at
    once. Thread-safe enough for counters (one caller thread per instance)."""

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._last = time.monotonic()
        self.refused = 0

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens < 1:
            self.refused += 1
            return False
        self._tokens -= 1
        return True


class WakePipe:
    """Lets any thread interrupt a loop blocked in zmq.Poller.poll (thread-safe `wake`)."""

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)

    def fileno(self) -> int:
        return self._read_fd

    def wake(self) -> None:
        # A full pipe already holds wake-ups: the loop will run either way; a closed one
        # belongs to a loop that has ended.
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._write_fd, b"\0")

    def drain(self) -> None:
        try:
            while os.read(self._read_fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        """Close both ends (idempotent: a second call does nothing)."""
        if self._read_fd >= 0:
            os.close(self._read_fd)
            os.close(self._write_fd)
            self._read_fd = self._write_fd = -1
