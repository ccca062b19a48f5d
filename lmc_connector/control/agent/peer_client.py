"""The fetching side of the peer channel: chunks from the same rank of another instance.

Used by the worker half's asynchronous loads (a prefix another instance holds) and by
`/move` across instances. Chunks are asked for in batches of about `BATCH_BYTES`, a few
batches in flight, so a long prefix streams at the link's rate while memory stays bounded.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections import deque
from collections.abc import Iterator, Sequence

import zmq

from lmc_connector.cache import CacheEngine, Chunk
from lmc_connector.cache.received import chunk_from_bytes
from lmc_connector.control.wire import peer as pw
from lmc_connector.control.wire.codec import MessageError, encode
from lmc_connector.control.wire.rpc import RpcClient, RpcError
from lmc_connector.control.wire.security import ChannelSecurity
from lmc_connector.tokens import ChunkKey

logger = logging.getLogger(__name__)

#: Bytes of plain chunks asked for in one request (fewer chunks for big layouts).
BATCH_BYTES = 64 * 2**20
#: Requests in flight to one peer: the next batch travels while the last one is stored.
WINDOW = 2


class PeerUnavailableError(ConnectionError):
    """The peer did not answer in time, is gone, or answered with an error: what arrived
    before is usable, the rest is a miss."""


class PeerClient:
    """Fetches chunks for one worker's cache from peer servers of other instances.

    Owns a request/reply client (one thread and its sockets). `fetch` and `drop` may be
    called from any thread and block their caller only. Construct, `start`, `close`.
    """

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        engine: CacheEngine,
        timeout_s: float,
        security: ChannelSecurity,
    ) -> None:
        self._layout = engine.layout
        self.timeout_s = timeout_s
        self.fingerprint = engine.layout.instance_fingerprint()
        self._client = RpcClient(context, "peer-client", security)
        self._replies = pw.chunks_decoder()
        plain = engine.layout.nbytes(engine.layout.chunk_size)
        self.batch = max(1, min(pw.MAX_FETCH_KEYS, BATCH_BYTES // max(1, plain)))

    def start(self) -> None:
        self._client.start()

    def close(self) -> None:
        self._client.close()

    @property
    def alive(self) -> bool:
        return self._client.alive

    def fetch(
        self, address: str, keys: Sequence[ChunkKey], location: str | None = None
    ) -> Iterator[tuple[ChunkKey, Chunk]]:
        """Chunks of the prefix of `keys` the peer at `address` holds, in order, as they
        arrive; ends at the peer's first miss. Raises PeerUnavailableError (after yielding
        what arrived) when the peer fails."""
        batches = [keys[i : i + self.batch] for i in range(0, len(keys), self.batch)]
        pending: deque[tuple[Sequence[ChunkKey], concurrent.futures.Future[list[zmq.Frame]]]]
        pending = deque()
        next_batch = 0
        while next_batch < len(batches) or pending:
            while next_batch < len(batches) and len(pending) < WINDOW:
                batch = batches[next_batch]
                request = pw.Fetch(self.fingerprint, list(batch), location)
                future = self._client.request(address, [encode(request)], self.timeout_s)
                pending.append((batch, future))
                next_batch += 1
            batch, future = pending.popleft()
            chunks = self._receive(address, future)
            yield from zip(batch, chunks, strict=False)
            if len(chunks) < len(batch):
                for _, rest in pending:
                    rest.cancel()
                return

    def drop(self, address: str, keys: Sequence[ChunkKey], location: str) -> int:
        """Ask the peer to remove these chunks from `location`; returns how many it removed."""
        dropped = 0
        for i in range(0, len(keys), pw.MAX_FETCH_KEYS):
            request = pw.Drop(self.fingerprint, list(keys[i : i + pw.MAX_FETCH_KEYS]), location)
            future = self._client.request(address, [encode(request)], self.timeout_s)
            header, _ = self._answer(address, future)
            dropped += header.dropped
        return dropped

    def _answer(
        self, address: str, future: concurrent.futures.Future[list[zmq.Frame]]
    ) -> tuple[pw.Chunks, list[zmq.Frame]]:
        try:
            frames = future.result(self.timeout_s + 1.0)
            header = self._replies.decode(frames[0].buffer)
        except (RpcError, MessageError, IndexError, concurrent.futures.TimeoutError) as e:
            raise PeerUnavailableError(f"peer {address}: {e or type(e).__name__}") from e
        if header.error is not None:
            raise PeerUnavailableError(f"peer {address} refused: {header.error}")
        return header, frames[1:]

    def _receive(
        self, address: str, future: concurrent.futures.Future[list[zmq.Frame]]
    ) -> list[Chunk]:
        header, frames = self._answer(address, future)
        if len(frames) != len(header.chunks):
            raise PeerUnavailableError(
                f"peer {address}: {len(header.chunks)} chunks announced, {len(frames)} sent"
            )
        try:
            return [
                chunk_from_bytes(self._layout, info.num_tokens, frame.buffer, info.method)
                for info, frame in zip(header.chunks, frames, strict=True)
            ]
        except ValueError as e:
            raise PeerUnavailableError(f"peer {address} sent a bad chunk: {e}") from e
