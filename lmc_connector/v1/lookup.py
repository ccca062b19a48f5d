"""The scheduler's lookup channel to the caches living in its worker processes.

Each worker serves lookups on a local IPC path derived from the engine id,
the data-parallel rank and its own rank, and optionally on TCP for a
scheduler on another host (`lookup_addresses.py` says which the scheduler
uses); the scheduler asks every reachable rank over the shared
request/reply transport and takes the minimum. Every wait is bounded: a
lookup that gets no answer within the timeout counts as a miss.

Both ends take the worker's `ChannelSecurity` (`control_secret_file`): with
a secret every lookup connection, IPC and TCP, is CURVE-authenticated and
encrypted, and `lookup_host` may name any address; without one the TCP
endpoint binds loopback only (or beyond with `control_insecure`).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable, Sequence
from typing import NamedTuple

import zmq

from lmc_connector.cache import CacheEngine
from lmc_connector.control.wire import lookup as lk
from lmc_connector.control.wire.codec import MessageError, encode
from lmc_connector.control.wire.rpc import Call, RpcClient, RpcError, RpcServer
from lmc_connector.control.wire.security import ChannelSecurity
from lmc_connector.control.wire.sockets import tcp_url
from lmc_connector.tokens import ChunkKey
from lmc_connector.v1.lookup_addresses import live_socket_holds

logger = logging.getLogger(__name__)


def source_runs(sources: Sequence[str]) -> list[tuple[str, int]]:
    """`["host", "host", "disk"]` -> `[("host", 2), ("disk", 1)]`."""
    runs: list[tuple[str, int]] = []
    for source in sources:
        if runs and runs[-1][0] == source:
            runs[-1] = (source, runs[-1][1] + 1)
        else:
            runs.append((source, 1))
    return runs


class Hit(NamedTuple):
    """What the scheduler learns from a lookup: tokens cached on every rank, and where
    (runs of (vLLM cache-hit source, chunks) in prefix order, from the rank with the least)."""

    tokens: int
    sources: list[tuple[str, int]]


MISS = Hit(0, [])


class PinRegistry:
    """Owns the pins held per request, so repeated lookups of one request never stack pins.

    Shared by the lookup server thread (lookups) and vLLM's worker thread (loads done).
    """

    def __init__(self, engine: CacheEngine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._held: dict[str, list[ChunkKey]] = {}

    def lookup(
        self, req_id: str, keys: Sequence[ChunkKey], num_tokens: int, pin: bool
    ) -> tuple[int, list[tuple[str, int]]]:
        """Cached prefix tokens, and runs of (hit source, chunks) saying where they are; with
        `pin` the local hits replace the request's earlier pins."""
        # Outside our lock: a shared store may be asked (the engine bounds that wait).
        found = self._engine.locate(keys, num_tokens, pin=pin)
        if pin:
            with self._lock:
                self._release(req_id)
                if found.pinned:
                    self._held[req_id] = found.pinned
        return found.tokens, source_runs([t.hit_source for t in found.tiers])

    def release(self, req_id: str) -> None:
        with self._lock:
            self._release(req_id)

    def _release(self, req_id: str) -> None:
        keys = self._held.pop(req_id, None)
        if keys:
            self._engine.unpin_keys(keys)

    def held(self) -> dict[str, list[ChunkKey]]:
        with self._lock:
            return {k: list(v) for k, v in self._held.items()}


class LookupServer:
    """Answers `Lookup`, `Unpin` and `Reset` for one worker's cache, on its request/reply
    server threads: one on the IPC `address`, one more on TCP (a free port of `tcp_host`)
    if given.

    Owns its ZMQ context and servers; `reset` empties the cache (the worker half's
    `reset`). Construct, `start` (refuses an IPC path a live server holds), `close`.
    """

    def __init__(
        self,
        address: str,
        pins: PinRegistry,
        reset: Callable[[bool], int],
        tcp_host: str | None = None,
        security: ChannelSecurity | None = None,
    ) -> None:
        self.address = address
        self._pins = pins
        self._reset = reset
        self._closed = False
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        security = ChannelSecurity() if security is None else security
        self._servers = [RpcServer(self._context, address, self._handle, "lookup", security)]
        if tcp_host is not None:
            url = tcp_url(tcp_host, 0)
            self._servers.append(
                RpcServer(self._context, url, self._handle, "lookup-tcp", security)
            )
        self._decoder = lk.lookup_request_decoder()
        #: The TCP address a scheduler on another host asks (after `start`), if any.
        self.tcp_address: str | None = None

    def start(self) -> None:
        """Bind and serve; RuntimeError naming the cause when an address is taken."""
        if live_socket_holds(self.address):
            self._closed = True
            self._context.term()
            raise RuntimeError(
                f"another vLLM server on this host already serves lookups at {self.address}: "
                "two servers share a kv_transfer_config engine_id (and data-parallel rank); "
                "give each server its own engine_id, or leave it unset"
            )
        started: list[RpcServer] = []
        for server in self._servers:
            try:
                server.start()
            except zmq.ZMQError as e:
                for running in started:
                    running.close()
                self._closed = True
                self._context.term()
                raise RuntimeError(f"lookup server could not bind {server.bind_url}: {e}") from e
            started.append(server)
        if len(self._servers) > 1:
            self.tcp_address = self._servers[1].endpoint

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for server in self._servers:
            server.close()
        self._context.term()

    def _handle(self, call: Call) -> None:
        try:
            msg = self._decoder.decode(call.frames[0].buffer)
        except MessageError as e:
            # Untrusted peer input: answer with the error, keep serving.
            call.reply([encode(lk.LookupReply(tokens=0, error=str(e)[:200]))])
            return
        if isinstance(msg, lk.Unpin):
            self._pins.release(msg.req_id)
            return
        if isinstance(msg, lk.Reset):
            self._handle_reset(call, msg)
            return
        keys = [ChunkKey(k) for k in msg.keys]
        try:
            tokens, sources = self._pins.lookup(msg.req_id, keys, msg.num_tokens, msg.pin)
        except Exception as e:
            # Boundary of the server thread: keep serving; the scheduler counts it as a miss.
            logger.exception("lookup server: lookup of %s failed", msg.req_id)
            call.reply([encode(lk.LookupReply(tokens=0, error=f"{type(e).__name__}: {e}"))])
            return
        call.reply([encode(lk.LookupReply(tokens=tokens, sources=sources))])

    def _handle_reset(self, call: Call, msg: lk.Reset) -> None:
        try:
            removed = self._reset(msg.shared)
        except Exception as e:
            # Boundary of the server thread: the scheduler reports the reset as failed to vLLM.
            logger.exception("lookup server: cache reset failed")
            call.reply([encode(lk.ResetReply(removed=0, error=f"{type(e).__name__}: {e}"))])
            return
        call.reply([encode(lk.ResetReply(removed=removed))])


class LookupClient:
    """The scheduler's side: ask every reachable rank, take the minimum, treat silence as a
    miss.

    Owns its ZMQ context and request/reply client and the address of each rank
    (None for a rank it cannot reach); used from the scheduler's thread.
    """

    def __init__(
        self,
        addresses: Sequence[str | None],
        timeout_ms: int,
        security: ChannelSecurity | None = None,
    ) -> None:
        self._addresses = [a for a in addresses if a is not None]
        self._timeout_s = timeout_ms / 1000
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        security = ChannelSecurity() if security is None else security
        self._client = RpcClient(self._context, "lookup-client", security)
        self._decoder = lk.lookup_reply_decoder()
        self._reset_decoder = lk.reset_reply_decoder()

    def start(self) -> None:
        self._client.start()

    def close(self) -> None:
        self._client.close()
        self._context.term()

    def set_addresses(self, addresses: Sequence[str | None]) -> None:
        """Replace the ranks' addresses (after the workers' handshake); None: not asked."""
        for gone in set(self._addresses) - {a for a in addresses if a is not None}:
            self._client.forget(gone)
        self._addresses = [a for a in addresses if a is not None]

    def lookup(
        self, req_id: str, keys: Sequence[ChunkKey], num_tokens: int, pin: bool = True
    ) -> Hit:
        """Tokens cached on every rank (the minimum over ranks) and where; a miss on any
        failure or timeout."""
        if not keys or not self._addresses:
            return MISS
        data = encode(lk.Lookup(req_id, list(keys), num_tokens, pin))
        futures = [self._client.request(a, [data], self._timeout_s) for a in self._addresses]
        answers: list[Hit] = []
        for future in futures:
            try:
                reply = self._decoder.decode(future.result(self._timeout_s + 1.0)[0].buffer)
            except (RpcError, MessageError, concurrent.futures.TimeoutError) as e:
                logger.warning("lookup for %s: a rank did not answer (%s): a miss", req_id, e)
                return MISS
            if reply.error is not None:
                logger.warning("lookup failed on a worker: %s", reply.error)
                return MISS
            answers.append(Hit(reply.tokens, list(reply.sources)))
        return min(answers, key=lambda hit: hit.tokens)

    def reset(self, shared: bool, timeout_s: float) -> bool:
        """Every rank empties its cache; True when all of them did within `timeout_s`."""
        data = encode(lk.Reset(shared))
        futures = [self._client.request(a, [data], timeout_s) for a in self._addresses]
        removed = 0
        for address, future in zip(self._addresses, futures, strict=True):
            try:
                reply = self._reset_decoder.decode(future.result(timeout_s + 1.0)[0].buffer)
            except (RpcError, MessageError, concurrent.futures.TimeoutError) as e:
                logger.error("cache reset: the worker at %s did not answer (%s)", address, e)
                return False
            if reply.error is not None:
                logger.error("cache reset failed on the worker at %s: %s", address, reply.error)
                return False
            removed += reply.removed
        logger.info(
            "cache reset: %d chunk entries removed on %d ranks", removed, len(self._addresses)
        )
        return True

    def unpin(self, req_id: str) -> None:
        """Every rank drops the pins it holds for `req_id` (no answer awaited)."""
        data = encode(lk.Unpin(req_id))
        for address in self._addresses:
            self._client.notify(address, [data])
