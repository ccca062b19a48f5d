"""The scheduler's lookup channel to the caches living in the worker processes.

Each worker binds a ROUTER socket on a local IPC path derived from the engine
id, the data-parallel rank and its own rank; the scheduler holds one DEALER
per worker. Messages are msgspec Structs (msgpack), never pickle.

Threading: `LookupServer` runs one daemon thread that owns its socket and
calls into the (thread-safe) cache engine. `LookupClient` is used from the
scheduler's thread only. Every wait is bounded: a lookup that gets no answer
within the timeout counts as a miss, never a hang.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec
import zmq

from lmc_connector.cache import CacheEngine
from lmc_connector.control.transport import configure

logger = logging.getLogger(__name__)

#: Milliseconds the server thread waits for a message before checking whether to stop.
_POLL_MS = 100


class Lookup(msgspec.Struct, tag=True, array_like=True, gc=False):
    """How many prefix tokens of a prompt with these chunk keys are cached (pin them)."""

    seq: int
    req_id: str
    keys: list[int]
    num_tokens: int
    pin: bool = True


class Unpin(msgspec.Struct, tag=True, array_like=True, gc=False):
    """Drop the pins taken by lookups of `req_id`; no reply."""

    req_id: str


class LookupReply(msgspec.Struct, array_like=True, gc=False):
    seq: int
    tokens: int
    error: str | None = None


Request = Lookup | Unpin


def channel_path(engine_id: str, dp_rank: int, rank: int) -> str:
    """The IPC address worker `rank` of an engine binds (short: socket paths are limited)."""
    digest = hashlib.blake2b(engine_id.encode(), digest_size=6).hexdigest()
    return f"ipc://{Path(tempfile.gettempdir()) / f'lmc-{digest}-{dp_rank}-{rank}.sock'}"


class PinRegistry:
    """Pins held per request, so repeated lookups of one request never stack pins.

    Shared by the server thread (lookups) and vLLM's worker thread (loads done).
    """

    def __init__(self, engine: CacheEngine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._held: dict[str, list[int]] = {}

    def lookup(self, req_id: str, keys: Sequence[int], num_tokens: int, pin: bool) -> int:
        """Cached prefix tokens; with `pin` the hit chunks replace the request's earlier pins."""
        chunk = self._engine.layout.chunk_size
        with self._lock, self._engine.lock:
            tokens = self._engine.lookup_keys(keys, num_tokens)
            if pin:
                self._release(req_id)
                hit = list(keys[: (tokens + chunk - 1) // chunk])
                if hit:
                    self._engine.pin_keys(hit)
                    self._held[req_id] = hit
        return tokens

    def release(self, req_id: str) -> None:
        with self._lock:
            self._release(req_id)

    def _release(self, req_id: str) -> None:
        keys = self._held.pop(req_id, None)
        if keys:
            self._engine.unpin_keys(keys)

    def held(self) -> dict[str, list[int]]:
        with self._lock:
            return {k: list(v) for k, v in self._held.items()}


class LookupServer:
    """Answers `Lookup` and `Unpin` messages for one worker's cache; construct, start, close."""

    def __init__(self, address: str, pins: PinRegistry) -> None:
        self.address = address
        self._pins = pins
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout: float = 10.0) -> None:
        self._thread = threading.Thread(target=self._run, name="lmc-lookup", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"lookup server on {self.address} did not start in {timeout}s")
        if self._error is not None:
            raise RuntimeError(f"lookup server could not bind {self.address}") from self._error

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        sock = ctx.socket(zmq.ROUTER)
        configure(sock)
        try:
            sock.bind(self.address)
        except zmq.ZMQError as e:
            self._error = e
            self._ready.set()
            sock.close()
            return
        self._ready.set()
        decoder = msgspec.msgpack.Decoder(Request)
        encoder = msgspec.msgpack.Encoder()
        try:
            while not self._stop.is_set():
                if not sock.poll(_POLL_MS):
                    continue
                frames = sock.recv_multipart()
                if len(frames) != 2:
                    logger.warning("lookup server: dropping a message of %d frames", len(frames))
                    continue
                reply = self._handle(decoder, frames[1])
                if reply is not None:
                    try:
                        sock.send_multipart([frames[0], encoder.encode(reply)], zmq.NOBLOCK)
                    except zmq.Again:
                        logger.warning("lookup server: reply dropped, the scheduler is not reading")
        finally:
            sock.close()

    def _handle(self, decoder: msgspec.msgpack.Decoder[Request], data: bytes) -> LookupReply | None:
        try:
            msg = decoder.decode(data)
        except msgspec.ValidationError as e:
            # Untrusted peer input: answer with the error, keep serving.
            logger.warning("lookup server: malformed message: %s", e)
            return LookupReply(seq=-1, tokens=0, error=str(e))
        if isinstance(msg, Unpin):
            self._pins.release(msg.req_id)
            return None
        try:
            tokens = self._pins.lookup(msg.req_id, msg.keys, msg.num_tokens, msg.pin)
        except Exception as e:
            # Boundary of the server thread: keep serving; the scheduler counts it as a miss.
            logger.exception("lookup server: lookup of %s failed", msg.req_id)
            return LookupReply(seq=msg.seq, tokens=0, error=f"{type(e).__name__}: {e}")
        return LookupReply(seq=msg.seq, tokens=tokens)


class LookupClient:
    """The scheduler's side: ask every worker, take the minimum, treat silence as a miss."""

    def __init__(self, addresses: Sequence[str], timeout_ms: int) -> None:
        self._addresses = list(addresses)
        self._timeout_s = timeout_ms / 1000
        self._socks: list[zmq.Socket[bytes]] = []
        self._seq = 0
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(LookupReply)

    def start(self) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        for address in self._addresses:
            sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
            configure(sock)
            sock.connect(address)
            self._socks.append(sock)

    def close(self) -> None:
        for sock in self._socks:
            sock.close()
        self._socks.clear()

    def lookup(self, req_id: str, keys: Sequence[int], num_tokens: int, pin: bool = True) -> int:
        """Tokens cached on every worker (the minimum over ranks); 0 on any failure or timeout."""
        if not keys or not self._socks:
            return 0
        self._seq += 1
        data = self._encoder.encode(Lookup(self._seq, req_id, list(keys), num_tokens, pin))
        for sock in self._socks:
            try:
                sock.send(data, zmq.NOBLOCK)
            except zmq.Again:
                logger.warning("lookup: worker queue full; treating %s as a miss", req_id)
                return 0
        deadline = time.monotonic() + self._timeout_s
        answers = [self._await(sock, self._seq, deadline) for sock in self._socks]
        if any(a is None for a in answers):
            logger.warning("lookup for %s timed out after %.1fs: a miss", req_id, self._timeout_s)
            return 0
        return min(a for a in answers if a is not None)

    def unpin(self, req_id: str) -> None:
        """Fire and forget: every worker drops the pins it holds for `req_id`."""
        data = self._encoder.encode(Unpin(req_id))
        for sock in self._socks:
            try:
                sock.send(data, zmq.NOBLOCK)
            except zmq.Again:
                logger.warning("unpin of %s dropped: worker queue full", req_id)

    def _await(self, sock: zmq.Socket[bytes], seq: int, deadline: float) -> int | None:
        while (left := deadline - time.monotonic()) > 0:
            if not sock.poll(int(left * 1000) + 1):
                return None
            try:
                reply = self._decoder.decode(sock.recv())
            except msgspec.DecodeError as e:
                logger.warning("lookup: malformed reply: %s", e)
                continue
            if reply.seq != seq:
                continue  # a late answer to an earlier, timed-out lookup
            if reply.error is not None:
                logger.warning("lookup failed on a worker: %s", reply.error)
                return None
            return reply.tokens
        return None
