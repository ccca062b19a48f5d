"""RemoteBackend: chunks in a shared Redis / Valkey / Redis Cluster, for every instance.

Saved chunks go up in the background (`writer.py`), encoded with
`remote_serde`; lookups ask the store in one pipelined round trip; loads fetch
many chunks per round trip. A store that is down, slow or answers nonsense is
a miss, never an error that reaches a request.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from typing_extensions import override

from lmc_connector.cache.chunk import Chunk, ChunkForm
from lmc_connector.cache.layout import ChunkLayout
from lmc_connector.cache.record import RecordFormatError, parse_header
from lmc_connector.cache.tiers.base import Marker, Tier, TierContext, TierUsage
from lmc_connector.cache.tiers.cpu import Compressor
from lmc_connector.cache.tiers.lru import LRUIndex
from lmc_connector.cache.tiers.remote import ops
from lmc_connector.cache.tiers.remote.arrivals import Arrival, Arrivals
from lmc_connector.cache.tiers.remote.client import Client, StoreSession
from lmc_connector.cache.tiers.remote.keys import StoreKeys
from lmc_connector.cache.tiers.remote.ops import ChunkNames
from lmc_connector.cache.tiers.remote.shelf import StoreShelf
from lmc_connector.cache.tiers.remote.values import Assembler, StoreValue, pieces_for, to_value
from lmc_connector.cache.tiers.remote.writer import Batch, StoreWriter
from lmc_connector.cache.tiers.shelf import CalibrationShelf
from lmc_connector.ops.allocator import Allocator, empty_cpu
from lmc_connector.remote_url import StoreAddress
from lmc_connector.tokens import ChunkKey

logger = logging.getLogger(__name__)

#: Bytes fetched per round trip on the load path (a prompt's chunks come in a few trips).
LOAD_BATCH_BYTES = 256 << 20
#: Loads and uploads move megabytes: their socket waits get at least this long.
BULK_TIMEOUT_MIN_S = 2.0
#: Seconds `flush` waits for queued uploads at most.
FLUSH_TIMEOUT_S = 10.0
#: Seconds a load waits at most for the assembly thread to place a chunk's pieces (local
#: copies: a stalled process, not a slow store); past it the chunk is a miss.
ASSEMBLY_TIMEOUT_S = 30.0
#: Chunks this worker remembers having written (what the controller's index shows).
MAX_WRITTEN = 1 << 18
#: Room for an encoded value beyond the plain chunk's bytes (codec headers of tiny chunks).
ENCODED_SLACK_BYTES = 64 << 10


class RemoteBackend(Tier):
    """The shared store as a tier of this worker's cache.

    Owns the store session (clients and health: lookups wait at most
    `remote_timeout_ms`, loads and uploads longer), the background writer,
    the assembly thread of loads, and the record of chunks this worker
    wrote (for the controller's index; bounded, oldest forgotten first).
    Called from vLLM's model-runner thread (`load_many`, `saved`), the
    loader's read-ahead thread (`load_many`), the lookup thread (`held`)
    and the control agent (the rest), never with the cache lock held: every
    method may wait on the network (`answers_from_memory` is False).
    """

    name = "RemoteBackend"
    answers_from_memory = False
    shared = True

    def __init__(
        self,
        ctx: TierContext,
        address: StoreAddress,
        layout: ChunkLayout,
        serde: str,
        timeout_s: float,
        encode: Compressor,
    ) -> None:
        super().__init__(ctx)
        self.address = address
        self.layout = layout
        self.serde = serde
        self.keys = StoreKeys(layout.fingerprint())
        self.session = StoreSession(address, timeout_s, max(timeout_s, BULK_TIMEOUT_MIN_S))
        self.writer = StoreWriter(self._upload)
        #: Memory for chunks read back (the CPU tier's pool when there is one).
        self.allocate: Allocator | None = None
        #: Plain chunks -> encoded with the serde (on the codec device); unused for naive.
        self._encode = encode
        #: Copies and checks pieces of chunks being loaded while the next pieces travel.
        self._assembly = ThreadPoolExecutor(1, thread_name_prefix="lmc-store-assembly")
        #: Chunks this worker wrote -> their stored bytes, oldest first, with their total
        #: (guarded by ctx.lock).
        self._written: LRUIndex[int] = LRUIndex(0, int)
        self._max_value_bytes = layout.nbytes(layout.chunk_size) + ENCODED_SLACK_BYTES
        #: Piece names a reader asks for: enough for the largest value of this layout.
        self._max_pieces = pieces_for(self._max_value_bytes)

    # -- lifecycle ----------------------------------------------------------------------------

    @override
    def open(self) -> None:
        """Start the writer; the store is first asked on the first lookup (it may be down)."""
        self.writer.start()
        logger.info(
            "%s: %s, serde %s, keys %s*", self.name, self.address.redacted(), self.serde,
            self.keys.namespace,
        )  # fmt: skip

    @override
    def close(self) -> None:
        self.writer.close()
        # Not waited for: a piece still being placed belongs to a read that times out on it.
        self._assembly.shutdown(wait=False, cancel_futures=True)
        self.session.close()

    @override
    def flush(self) -> None:
        """Wait (boundedly) until the uploads queued so far are done."""
        self.writer.wait_idle(FLUSH_TIMEOUT_S)

    def _call(self, action: str, bulk: bool, fn: Callable[[Client], Any]) -> Any:
        return self.session.call(action, bulk, fn)

    @override
    def calibration_shelf(self) -> CalibrationShelf:
        return StoreShelf(self.session, self.keys.namespace)

    # -- queries ------------------------------------------------------------------------------

    @override
    def held(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """One pipelined round trip (`EXISTS` per key); all False if the store does not answer."""
        heads = [self.keys.head(k) for k in keys]
        found = self._call("lookup", False, lambda c: ops.exists(c, heads))
        if found is None:
            return [False] * len(keys)
        self._forget([k for k, hit in zip(keys, found, strict=True) if not hit])
        return [bool(hit) for hit in found]

    @override
    def forms(self, keys: Sequence[ChunkKey]) -> list[ChunkForm | None]:
        """From the heads alone (one round trip); a head that does not parse reads None."""
        names = [self.keys.head(k) for k in keys]
        heads = self._call("read heads", False, lambda c: ops.read_heads(c, names))
        out: list[ChunkForm | None] = []
        for key, name, head in zip(keys, names, heads or [None] * len(keys), strict=True):
            try:
                header = parse_header(head, name, key) if isinstance(head, bytes) else None
            except RecordFormatError:
                header = None
            out.append(None if header is None else ChunkForm(header.num_tokens, header.method))
        return out

    @override
    def touch(self, key: ChunkKey) -> bool:
        """Whether the store holds `key` (Redis refreshes its own recency on every read)."""
        return self.held([key])[0]

    @override
    def chunk_keys(self) -> list[ChunkKey]:
        with self.ctx.lock:
            return list(self._written)

    @override
    def usage(self) -> TierUsage:
        """What this worker wrote (the store's own size is the operator's `maxmemory`)."""
        with self.ctx.lock:
            return TierUsage(len(self._written), self._written.used_bytes, 0)

    # -- loads ----------------------------------------------------------------------------------

    @override
    def load(self, key: ChunkKey) -> tuple[Marker, Chunk | None]:
        found = self._fetch([key])
        return found[0] if found else (None, None)

    @override
    def load_many(self, keys: Sequence[ChunkKey]) -> list[Chunk | None]:
        """The chunks of `keys`: one round trip for the heads of a batch, then each chunk's
        pieces; stops after the first miss (the rest come back None)."""
        out: list[Chunk | None] = []
        per_trip = max(1, LOAD_BATCH_BYTES // self._max_value_bytes)
        for start in range(0, len(keys), per_trip):
            batch = keys[start : start + per_trip]
            found = [chunk for _, chunk in self._fetch(batch)]
            out.extend(found)
            if len(found) < len(batch) or None in found:
                break
        return out + [None] * (len(keys) - len(out))

    def names(self, key: ChunkKey) -> ChunkNames:
        """The head and every possible piece name of `key`."""
        return ChunkNames(self.keys.head(key), self.keys.pieces(key, self._max_pieces))

    def _staged(self, key: ChunkKey, pieces: int) -> ChunkNames:
        """Fresh names to stage a value of `key` under before it is renamed into place."""
        staging = self.keys.staging(key)
        return ChunkNames(staging, self.keys.pieces(key, pieces, staging))

    def _fetch(self, keys: Sequence[ChunkKey]) -> list[tuple[Marker, Chunk | None]]:
        """(head, chunk) of the leading keys found; ends at the first miss (its entry (None,
        None)). One round trip for the heads, then every piece in one stream (`arrivals.py`)."""
        names = [self.keys.head(k) for k in keys]
        heads = self._call("load", True, lambda c: ops.read_heads(c, names))
        arriving: list[Arrival] = []
        damaged: tuple[ChunkKey, str, Exception] | None = None
        for key, name, head in zip(keys, names, heads or [], strict=False):
            if head is None:
                self._forget([key])
                break
            try:
                arriving.append(self._arrival(key, name, head))
            except (RecordFormatError, ValueError) as e:
                damaged = (key, name, e)
                break
        out: list[tuple[Marker, Chunk | None]] = []
        complete = self._receive(arriving)
        for arrival in arriving[:complete]:
            try:
                chunk = arrival.finish()
                self._check_layout(chunk)
            except (RecordFormatError, ValueError) as e:
                self._drop_damaged(arrival.key, arrival.name, e)
                return [*out, (None, None)]
            out.append((arrival.head, chunk))
        if complete == len(arriving) and damaged is not None:
            self._drop_damaged(*damaged)
        return out if len(out) == len(keys) else [*out, (None, None)]

    def _arrival(self, key: ChunkKey, name: str, head: Any) -> Arrival:
        if isinstance(head, BaseException):
            raise ValueError(f"not a chunk value ({head})")
        assembler = Assembler(head, name, key, self._max_pieces, self.allocate or empty_cpu)
        return Arrival(key, name, head, assembler, self.keys.pieces(key, assembler.count))

    def _receive(self, arriving: list[Arrival]) -> int:
        """Fetch every piece of `arriving`; returns how many leading chunks got them all,
        placed. What the store failed to send, or took too long to place, is a miss that
        stays in the store."""
        if not arriving:
            return 0
        # Place on the assembly thread only where this thread has a second core to overlap
        # with: on one core, a hand-off per piece waits on the scheduler instead.
        stream = Arrivals(arriving, self._assembly if _cores_here() > 1 else None)
        names = stream.names
        try:
            self._call("load", True, lambda c: ops.read_pieces(c, names, stream.take))
        finally:  # what was handed to the assembly thread is placed before anything else
            complete, late = stream.ready(ASSEMBLY_TIMEOUT_S)
        if late:
            logger.warning("%s: placing its pieces took over %.0f s: a miss",
                           arriving[complete].name, ASSEMBLY_TIMEOUT_S)  # fmt: skip
        return complete

    def _drop_damaged(self, key: ChunkKey, name: str, error: Exception) -> None:
        # Also what a piece evicted by Redis looks like: the rest goes too.
        logger.error("%s: dropping a damaged value (recomputed instead): %s", name, error)
        names = [self.names(key)]
        self._call("drop a damaged value", True, lambda c: ops.unlink(c, names))
        self._forget([key])

    def _check_layout(self, chunk: Chunk) -> None:
        if chunk.kv is not None:
            self.layout.check(chunk.kv)
            return
        from lmc_connector.ops.codecs import peek_header

        assert chunk.blob is not None
        shape = peek_header(chunk.blob).shape
        if shape[:2] + shape[3:] != self.layout.shape(0)[:2] + self.layout.shape(0)[3:]:
            raise ValueError(f"encoded chunk of shape {shape} does not fit this layout")

    # -- writes -----------------------------------------------------------------------------

    @override
    def saved(self, key: ChunkKey, chunk: Chunk) -> None:
        """Queue an upload (never blocks; dropped and counted when the queue is full)."""
        if not self.writer.offer(key, chunk):
            self.ctx.stats.save_dropped(self.name)

    @override
    def store(
        self, key: ChunkKey, chunk: Chunk, still_wanted: Callable[[], bool] | None = None
    ) -> bool:
        """Write `chunk` now (encoded with the serde) unless the store has it already."""
        if still_wanted is not None and not still_wanted():
            return False
        return self._upload([(key, chunk)])

    def _upload(self, batch: Batch) -> bool:
        """Write the chunks of `batch` the store lacks (writer thread, or `store`); whether the
        store holds them all now."""
        heads = [self.keys.head(k) for k, _ in batch]
        present = self._call("upload", True, lambda c: ops.exists(c, heads))
        if present is None:
            self._dropped(len(batch))
            return False
        todo = [(k, c) for (k, c), there in zip(batch, present, strict=True) if not there]
        if not todo:
            return True
        self.session.check_eviction()
        encoded = self._values(todo)
        too_big = [k for k, v in encoded if len(v.pieces) > self._max_pieces]
        if too_big:
            logger.error("%s: %d values exceed this layout's size; not stored", self.name,
                         len(too_big))  # fmt: skip
            encoded = [(k, v) for k, v in encoded if len(v.pieces) <= self._max_pieces]
        writes = [(self.names(k), self._staged(k, len(v.pieces)), v) for k, v in encoded]
        done = self._call("upload", True, lambda c: ops.write_values(c, writes))
        if done is None:
            self._dropped(len(todo))
            return False
        written = [(k, v.nbytes) for (k, v), ok in zip(encoded, done, strict=True) if ok]
        tokens = {k: c.num_tokens for k, c in todo}
        for key, nbytes in written:
            self.ctx.stats.saved(self.name, tokens[key], nbytes)
        with self.ctx.lock:
            for key, nbytes in written:
                self._written.set(key, nbytes)
            self.ctx.admitted(self.name, [k for k, _ in written])
            overflow = len(self._written) - MAX_WRITTEN
            if overflow > 0:
                self.ctx.evicted(self.name, self._written.pop_oldest(overflow))
        return not too_big

    def _dropped(self, chunks: int) -> None:
        self.writer.dropped(chunks)
        self.ctx.stats.save_dropped(self.name, chunks)

    def _values(self, chunks: Batch) -> list[tuple[ChunkKey, StoreValue]]:
        """Store values of `chunks`: plain ones encoded with the serde (`naive`: as they are),
        encoded ones as they are (every value says how it was encoded)."""
        plain = [(key, chunk) for key, chunk in chunks if chunk.kv is not None]
        coded: dict[ChunkKey, Chunk] = {}
        if self.serde != "naive" and plain:
            encoded = self._encode([chunk for _, chunk in plain])
            coded = {key: chunk for (key, _), chunk in zip(plain, encoded, strict=True)}
        return [(key, to_value(key, coded.get(key, chunk))) for key, chunk in chunks]

    @override
    def replace(self, key: ChunkKey, marker: Marker, chunk: Chunk) -> bool | None:
        """Swap the value for `chunk` (as given) if it still holds what `marker` saw."""
        if not isinstance(marker, bytes):
            return None
        value = to_value(key, chunk)
        if len(value.pieces) > self._max_pieces:
            return False
        staged = self._staged(key, len(value.pieces))
        swapped = self._call(
            "replace", True, lambda c: ops.swap_value(c, self.names(key), staged, marker, value)
        )
        if swapped is None:
            return False
        if swapped:
            with self.ctx.lock:
                if key in self._written:
                    self._written.set(key, value.nbytes)
            return True
        return None

    # -- removal ------------------------------------------------------------------------------

    @override
    def remove(self, keys: Sequence[ChunkKey]) -> int:
        names = [self.names(k) for k in keys]
        gone = self._call("remove", False, lambda c: ops.unlink(c, names))
        if gone is None:
            return 0
        removed = [k for k, was in zip(keys, gone, strict=True) if was]
        self._forget(removed)
        return len(removed)

    @override
    def remove_seen(self, key: ChunkKey, marker: Marker) -> bool:
        if not isinstance(marker, bytes):
            return False
        names = self.names(key)
        gone = self._call("remove", False, lambda c: ops.unlink_if(c, names, marker))
        if gone:
            self._forget([key])
        return bool(gone)

    @override
    def clear(self) -> tuple[int, int]:
        """Unlink every name of this layout but pinned chunks (SCAN + UNLINK in batches; other
        layouts and other data in the store are never touched)."""
        result = self._call("clear", True, self._clear)
        return (0, 0) if result is None else result

    def _clear(self, client: Client) -> tuple[int, int]:
        removed, kept = ops.unlink_layout(client, self.keys, self.ctx.is_pinned, self._forget)
        logger.info("%s: cleared %d chunks (%d pinned kept)", self.name, removed, kept)
        return removed, kept

    def _forget(self, keys: Sequence[ChunkKey]) -> None:
        """These chunks are no longer in the store: drop them from the written record."""
        if not keys:
            return
        with self.ctx.lock:
            gone = [k for k in keys if self._written.pop(k) is not None]
            self.ctx.evicted(self.name, gone)


def _cores_here() -> int:
    """CPUs the calling thread may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
