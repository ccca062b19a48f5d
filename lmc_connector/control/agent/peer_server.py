"""The peer server in each worker: serves this worker's chunks, as stored, to the same rank
of other instances (`p2p_host`, `p2p_init_ports[rank]`).

Chunk bytes leave without a copy: each reply frame is a view of the stored tensor, or the
stored codec blob (compressed chunks travel compressed). Cached chunks are immutable, and a
frame in flight holds a reference to its tensor, so the CPU tier never recycles a buffer
that is still being sent.
"""

from __future__ import annotations

import logging

import zmq

from lmc_connector.cache import CacheEngine, UnknownLocationError
from lmc_connector.cache.chunk import Chunk
from lmc_connector.cache.record import payload
from lmc_connector.control.wire import peer as pw
from lmc_connector.control.wire.codec import MessageError, encode
from lmc_connector.control.wire.rpc import Call, RpcServer
from lmc_connector.control.wire.security import ChannelSecurity
from lmc_connector.control.wire.sockets import MAX_MESSAGE_BYTES
from lmc_connector.throttle import Throttle
from lmc_connector.tokens import ChunkKey

logger = logging.getLogger(__name__)

#: Seconds between two warnings about bad peer requests.
WARN_EVERY_S = 10.0
#: Bytes of chunks one reply carries at most (the leading chunks that fit; the asker takes
#: the rest as misses): what a peer's request can make this worker hold per reply.
MAX_REPLY_BYTES = MAX_MESSAGE_BYTES


class PeerServer:
    """Answers `Fetch` and `Drop` from workers of other instances for one worker's cache.

    Owns its request/reply server (one thread, one ROUTER socket); requests are handled on
    that thread, which reads tiers (a disk tier read happens there too) and never vLLM's.
    Counters are read by tests and logs. Construct, `start`, `close`.
    """

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        engine: CacheEngine,
        bind_url: str,
        security: ChannelSecurity,
        name: str = "peer-server",
    ) -> None:
        self._engine = engine
        self.fingerprint = engine.layout.instance_fingerprint()
        self._server = RpcServer(context, bind_url, self._handle, name, security)
        self._decoder = pw.peer_request_decoder()
        self._warn = Throttle(WARN_EVERY_S)
        self.served_chunks = 0
        self.served_bytes = 0
        self.refused = 0

    @property
    def endpoint(self) -> str:
        return self._server.endpoint

    @property
    def alive(self) -> bool:
        return self._server.alive

    def start(self) -> None:
        """Bind (raises zmq.ZMQError when the port is taken) and serve."""
        self._server.start()

    def close(self) -> None:
        self._server.close()

    def _refuse(self, call: Call, why: str) -> None:
        self.refused += 1
        if self._warn.ready():
            logger.warning("peer server: refused a request: %s", why)
        call.reply([encode(pw.Chunks(error=why[:300]))])

    def _handle(self, call: Call) -> None:
        try:
            request = self._decoder.decode(call.frames[0].buffer)
        except MessageError as e:
            self._refuse(call, str(e))
            return
        if request.layout != self.fingerprint:
            self._refuse(
                call,
                f"layout {request.layout} is not this worker's {self.fingerprint} (another "
                "model, world size, dtype or chunk size)",
            )
            return
        keys = [ChunkKey(k) for k in request.keys]
        try:
            if isinstance(request, pw.Drop):
                dropped = self._engine.tier(request.location).remove(keys)
                call.reply([encode(pw.Chunks(dropped=dropped))])
                return
            chunks = self._engine.stored(keys, request.location)
        except UnknownLocationError as e:
            self._refuse(call, str(e))
            return
        chunks = _within(chunks, MAX_REPLY_BYTES)
        header = pw.Chunks([pw.ChunkInfo(c.num_tokens, c.method) for c in chunks])
        frames: list[bytes | memoryview] = [encode(header)]
        frames.extend(payload(c) for c in chunks)
        self.served_chunks += len(chunks)
        self.served_bytes += sum(c.nbytes for c in chunks)
        call.reply(frames)


def _within(chunks: list[Chunk], budget: int) -> list[Chunk]:
    """The leading chunks whose bytes add up to at most `budget`."""
    total = 0
    for count, chunk in enumerate(chunks):
        total += chunk.nbytes
        if total > budget:
            return chunks[:count]
    return chunks
