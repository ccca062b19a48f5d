"""Reading a load's next chunks while the loader writes the current ones.

A load from the shared store or the disk waits for each round's bytes before it
decodes and writes them (timed in vLLM for `remote_tier.py`'s 4K prompt stored with
cachegen, 16 chunks: 11 ms reading, 35 ms decoding, 22 ms writing into the paged
cache). With a second core, the next round's read runs on a thread of its own while
the current round is written (one core's work; the decode before it already runs on
every core, and a read during it only competed: measured slower). With one core, a
hand-off per round would only wait on the scheduler, and reads stay on the caller's
thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from lmc_connector.affinity import process_cpus, widen_current_thread
from lmc_connector.cache.chunk import Chunk
from lmc_connector.tokens import ChunkKey

#: Longest wait for one round's read (a store's own timeouts end it far sooner).
READ_TIMEOUT_S = 60.0

logger = logging.getLogger(__name__)

Read = Callable[[Sequence[ChunkKey]], list[Chunk]]


class ReadAhead:
    """Owns the reader thread (started on first use) and the one read in flight: a load's
    next round of chunks, read while vLLM's model-runner thread writes the current one.
    Used by the model-runner thread only."""

    def __init__(self, read: Read, overlap: bool | None = None) -> None:
        self._read = read
        self._overlap = len(process_cpus()) > 1 if overlap is None else overlap
        self._executor: ThreadPoolExecutor | None = None
        self._pending: tuple[Sequence[ChunkKey], Future[list[Chunk]] | None] | None = None

    def start(self, keys: Sequence[ChunkKey]) -> None:
        """Begin reading the chunks of `keys` (on the reader thread with a second core to run
        it on; else `take` reads them)."""
        assert self._pending is None, "take (or abandon) the read in flight first"
        future = self._pool().submit(self._read, keys) if self._overlap else None
        self._pending = (keys, future)

    def take(self) -> list[Chunk]:
        """The chunks of the keys last started, as `read` returned them (a prefix: a miss
        ends it; a read that outlasts READ_TIMEOUT_S is a miss)."""
        assert self._pending is not None, "start a read first"
        keys, future = self._pending
        self._pending = None
        if future is None:
            return self._read(keys)
        try:
            return future.result(timeout=READ_TIMEOUT_S)
        except FutureTimeout:
            logger.warning("reading cached chunks took over %.0f s: a miss", READ_TIMEOUT_S)
            return []

    def abandon(self) -> None:
        """Forget the read in flight, if any (a load that stopped early)."""
        if self._pending is not None:
            _, future = self._pending
            self._pending = None
            if future is not None and not future.cancel():
                future.add_done_callback(_report_failure)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                1, thread_name_prefix="lmc-read-ahead", initializer=widen_current_thread
            )
        return self._executor


def _report_failure(read: Future[list[Chunk]]) -> None:
    """Log what went wrong with a read whose chunks nobody waited for."""
    error = read.exception()
    if error is not None:
        logger.warning("reading cached chunks ahead failed: %s", error, exc_info=error)
