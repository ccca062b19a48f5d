"""The background writer of the shared store: saved chunks go up without blocking vLLM."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from lmc_connector.cache.chunk import Chunk
from lmc_connector.throttle import Throttle
from lmc_connector.tokens import ChunkKey

logger = logging.getLogger(__name__)

#: Bounds of what waits to be uploaded: the chunks are shared with the CPU tier while they
#: stay there, but a queued chunk evicted meanwhile lives on here until it is sent.
MAX_QUEUED_CHUNKS = 4096
MAX_QUEUED_BYTES = 1 << 30
#: Chunks (and bytes) written per batch: one round trip asks which the store lacks, one
#: pipeline writes those.
BATCH_CHUNKS = 16
BATCH_BYTES = 256 << 20
#: Seconds between log lines about dropped uploads.
DROP_LOG_INTERVAL_S = 30.0
#: Seconds an idle writer sleeps before it looks at its queue again (offer and close wake it
#: at once; the timeout only bounds the wait).
IDLE_WAIT_S = 1.0
#: Niceness of the writer thread (Linux sets it per thread): uploads yield the CPU to
#: vLLM's forward and the load path when cores are scarce.
WRITER_NICE = 10

Batch = list[tuple[ChunkKey, Chunk]]


@dataclass(slots=True)
class WriterCounts:
    """What the writer did so far (read by benchmarks, tests and log lines)."""

    queued: int = 0
    #: Not queued: the queue was full.
    dropped_full: int = 0
    #: Taken from the queue but not sent: the store was down or the upload failed.
    dropped_failed: int = 0


class StoreWriter:
    """Owns the queue of chunks to upload (bounded in chunks and bytes) and the thread that
    drains it in batches through `upload`.

    `offer` is called on vLLM's model-runner thread (through `Tier.saved`) and
    never blocks: a full queue drops the chunk and counts it. `upload` runs
    on the writer thread and raises only for programming errors (a store
    failure is its own business: it returns). Construct, `start`, `close`.
    """

    def __init__(self, upload: Callable[[Batch], object], name: str = "lmc-store-writer") -> None:
        self._upload = upload
        self._name = name
        self._queue: deque[tuple[ChunkKey, Chunk]] = deque()
        self._queued_keys: set[ChunkKey] = set()
        self._queued_bytes = 0
        self._busy = False
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.counts = WriterCounts()
        self._drop_log = Throttle(DROP_LOG_INTERVAL_S)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def close(self, drain_timeout_s: float = 5.0) -> None:
        """Finish what is queued (up to `drain_timeout_s`), then stop the thread."""
        self.wait_idle(drain_timeout_s)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(drain_timeout_s)

    def offer(self, key: ChunkKey, chunk: Chunk) -> bool:
        """Queue `chunk` for upload unless it is already queued; False when dropped."""
        with self._cond:
            if key in self._queued_keys:
                return True
            full = len(self._queue) >= MAX_QUEUED_CHUNKS
            if self._closed or full or self._queued_bytes + chunk.nbytes > MAX_QUEUED_BYTES:
                self.counts.dropped_full += 1
                self._log_drops()
                return False
            self._queue.append((key, chunk))
            self._queued_keys.add(key)
            self._queued_bytes += chunk.nbytes
            self.counts.queued += 1
            self._cond.notify()
        return True

    def dropped(self, chunks: int) -> None:
        """The upload of a batch gave up on `chunks` chunks (the store failed)."""
        with self._cond:
            self.counts.dropped_failed += chunks
            self._log_drops()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until everything queued so far has been handled; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None or not self._thread.is_alive():
                    return False
                self._cond.wait(left)
        return True

    def _log_drops(self) -> None:
        if self._drop_log.ready():
            c = self.counts
            logger.warning(
                "shared store: %d chunks not uploaded so far (%d: upload queue full, %d: store "
                "unavailable or failing); they stay in the local tiers",
                c.dropped_full + c.dropped_failed,
                c.dropped_full,
                c.dropped_failed,
            )

    def _take(self) -> Batch | None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()
            while not self._queue and not self._closed:
                self._cond.wait(IDLE_WAIT_S)
            if not self._queue:
                return None
            batch: Batch = []
            size = 0
            while self._queue and len(batch) < BATCH_CHUNKS and (not batch or size < BATCH_BYTES):
                key, chunk = self._queue.popleft()
                self._queued_keys.discard(key)
                self._queued_bytes -= chunk.nbytes
                size += chunk.nbytes
                batch.append((key, chunk))
            self._busy = True
            return batch

    def _run(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # not Linux: normal priority
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
        while (batch := self._take()) is not None:
            try:
                self._upload(batch)
            except Exception:
                # Boundary of the writer thread: this batch is lost (a future miss), the
                # thread goes on with the next one.
                logger.exception("shared store: uploading %d chunks failed", len(batch))
                self.dropped(len(batch))
        with self._cond:
            self._busy = False
            self._cond.notify_all()
