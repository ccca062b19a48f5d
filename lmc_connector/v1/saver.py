"""Saves off vLLM's critical path: chunks are copied out of the paged cache in the background.

`wait_for_save` only hands the step's chunks to a `ChunkSaver` and returns.
Its thread, for each chunk, gathers the chunk's blocks (on CUDA on a side
stream, after an event recorded on the compute stream once the step's
forward was issued), brings it to host memory through page-locked staging,
builds the chunk tensor and puts it into the cache engine. A chunk appears in
the cache only once complete, so a lookup or load racing a save sees a miss,
never half a chunk.

Reading the paged cache later is safe because nothing overwrites the blocks
meanwhile: a prompt's KV is written once; a finished request's blocks stay
allocated until the worker reports its saves done (`done_requests`, the
connector delays their release through `request_finished`); a preempted
request's queued chunks are cancelled, and its chunk in progress waited for,
before the next forward (`cancel`).

The queue is bounded: a chunk that does not fit is dropped and counted (a
future miss, never a stall).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass

import torch

from lmc_connector.cache import CacheEngine
from lmc_connector.ops.paged import PagedKV
from lmc_connector.throttle import Throttle
from lmc_connector.tokens import ChunkKey
from lmc_connector.v1.staging import Staging

logger = logging.getLogger(__name__)

#: Seconds between two "save queue full" warnings.
DROP_WARN_EVERY_S = 10.0
#: Longest wait for the save thread when a preempted request's chunk is in progress, and for
#: a drain; a copy takes milliseconds, so reaching it means the thread is stuck.
WAIT_TIMEOUT_S = 30.0
#: Seconds an idle save thread sleeps before it looks at its queue again (a save and close
#: wake it at once; the timeout only bounds the wait).
IDLE_WAIT_S = 1.0


@dataclass(slots=True)
class SaveJob:
    """Copy tokens [start, end) of a request (its block table `table`, a CPU tensor) into the
    cache under `key`. `ready`, on CUDA, is recorded on the compute stream after the forward
    that wrote them."""

    req_id: str
    key: ChunkKey
    start: int
    end: int
    table: torch.Tensor
    ready: torch.cuda.Event | None = None


@dataclass(slots=True)
class SaveStats:
    """Counters since start (read by benchmarks and logs; written by both threads under the
    saver's lock)."""

    submitted: int = 0
    stored: int = 0
    #: Chunks not stored because the queue was full, the request was preempted, the copy
    #: failed, or the cache had no room for them.
    dropped_full: int = 0
    dropped_preempted: int = 0
    failed: int = 0
    not_stored: int = 0
    copy_seconds: float = 0.0
    #: Steps that handed saves over, and the time vLLM's thread spent doing it (`wait_for_save`).
    handoff_steps: int = 0
    handoff_seconds: float = 0.0


class ChunkSaver:
    """Owns the queue of chunks to save (at most `max_queued`), the save thread and its
    staging buffers.

    Callers: vLLM's model-runner thread (`submit`, `cancel`, `done_requests`,
    `drain`); the save thread runs the copies and `put`s. Construct, `start`,
    `close`.
    """

    def __init__(self, engine: CacheEngine, paged: PagedKV, max_queued: int) -> None:
        self._engine = engine
        self._paged = paged
        self._max_queued = max_queued
        self._queue: deque[SaveJob] = deque()
        #: Chunks per request that are queued or being copied.
        self._pending: Counter[str] = Counter()
        self._current: SaveJob | None = None
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="lmc-save", daemon=True)
        self._staging: Staging | None = None
        self._stream = torch.cuda.Stream(paged.device) if paged.device.type == "cuda" else None
        self._drop_warning = Throttle(DROP_WARN_EVERY_S)
        self.stats = SaveStats()

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop after the chunk in progress; queued chunks are dropped."""
        with self._cond:
            self._stop = True
            self._queue.clear()
            self._pending.clear()
            self._cond.notify_all()
        self._thread.join(timeout=WAIT_TIMEOUT_S)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- model-runner thread ---------------------------------------------------------------

    def submit(self, jobs: list[SaveJob]) -> int:
        """Queue the chunks of one request in order; returns how many were accepted.

        Chunks beyond the queue's room are dropped, and with them the rest of
        the request's chunks (a later chunk is useless without the earlier one).
        """
        with self._cond:
            room = max(0, self._max_queued - len(self._queue)) if not self._stop else 0
            accepted = jobs[:room]
            self._queue.extend(accepted)
            for job in accepted:
                self._pending[job.req_id] += 1
            dropped = len(jobs) - len(accepted)
            self.stats.submitted += len(jobs)
            self.stats.dropped_full += dropped
            if accepted:
                self._cond.notify()
        if dropped and self._drop_warning.ready():
            logger.warning(
                "save queue full (%d chunks): %d chunks of %s not saved (%d dropped in all); "
                "raise save_queue_chunks if this persists",
                self._max_queued,
                dropped,
                jobs[0].req_id,
                self.stats.dropped_full,
            )
        return len(accepted)

    def cancel(self, req_ids: set[str]) -> None:
        """Drop the queued chunks of `req_ids` and wait for one of theirs in progress: their
        blocks are about to be given to other requests."""
        if not req_ids:
            return
        deadline = time.monotonic() + WAIT_TIMEOUT_S
        with self._cond:
            kept: deque[SaveJob] = deque()
            for job in self._queue:
                if job.req_id in req_ids:
                    self._settle(job)
                    self.stats.dropped_preempted += 1
                else:
                    kept.append(job)
            self._queue = kept
            while self._current is not None and self._current.req_id in req_ids:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    logger.error("save thread did not finish a chunk in %.0f s", WAIT_TIMEOUT_S)
                    return
                self._cond.wait(left)

    def done_requests(self, req_ids: set[str]) -> set[str]:
        """Those of `req_ids` with no chunk queued or in progress."""
        with self._cond:
            return {r for r in req_ids if self._pending[r] == 0}

    def drain(self, timeout: float = WAIT_TIMEOUT_S) -> bool:
        """Wait until every queued chunk is handled; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._current is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(left)
        return True

    # -- save thread -----------------------------------------------------------------------

    def _settle(self, job: SaveJob) -> None:
        """Count `job` as no longer pending (caller holds the lock)."""
        self._pending[job.req_id] -= 1
        if self._pending[job.req_id] <= 0:
            del self._pending[job.req_id]

    def _run(self) -> None:
        if self._stream is None:
            # On the CPU this thread's copies would start a second team of OpenMP threads
            # beside the forward's and slow it down; one thread copies fast enough in the
            # background. (The setting is per thread: the forward keeps its threads.)
            torch.set_num_threads(1)
        try:
            self._staging = Staging(self._paged, self._engine.layout.chunk_size)
            while True:
                with self._cond:
                    while not self._queue and not self._stop:
                        self._cond.wait(IDLE_WAIT_S)
                    if self._stop:
                        return
                    job = self._current = self._queue.popleft()
                outcome = self._save(job)
                with self._cond:
                    self._current = None
                    if self._pending[job.req_id] > 0:  # not cleared by close()
                        self._settle(job)
                    if outcome:
                        self.stats.stored += 1
                    else:
                        self.stats.not_stored += 1
                    self._cond.notify_all()
        except Exception:
            # Boundary of the save thread: saving stops (every later chunk is a miss); the
            # worker keeps serving and `alive` turns False.
            logger.exception("save thread failed; this worker saves nothing from now on")
            with self._cond:
                self._current = None
                self._queue.clear()
                self._pending.clear()
                self._cond.notify_all()

    def _save(self, job: SaveJob) -> bool:
        engine, paged = self._engine, self._paged
        if engine.contains(job.key):
            return True
        started = time.perf_counter()
        try:
            kv = self._copy(job)
        except (RuntimeError, ValueError, IndexError):
            # A copy that fails (bad block table, device error) loses this chunk only.
            logger.exception("%s: copying chunk [%d, %d) failed", job.req_id, job.start, job.end)
            self.stats.failed += 1
            return False
        self.stats.copy_seconds += time.perf_counter() - started
        assert kv.shape == paged.chunk_shape(job.end - job.start)
        return engine.put(job.key, kv, copy=False)

    def _copy(self, job: SaveJob) -> torch.Tensor:
        """The chunk tensor (CPU, from the cache's buffer pool) of one job."""
        paged, staging = self._paged, self._staging
        assert staging is not None
        tokens = job.end - job.start
        slot = staging.next_slot()
        host = paged.scratch_view(slot.host, tokens)
        if self._stream is None:
            paged.gather(paged.index(job.table, job.start, job.end), host)
        else:
            with torch.cuda.stream(self._stream):
                if job.ready is not None:
                    self._stream.wait_event(job.ready)
                table = job.table.to(paged.device, non_blocking=True)
                device = paged.scratch_view(slot.device, tokens)
                paged.gather(paged.index(table, job.start, job.end), device)
                host.copy_(device, non_blocking=True)
                assert slot.event is not None
                slot.event.record(self._stream)
            slot.event.synchronize()
        out = self._engine.new_buffer(paged.chunk_shape(tokens), paged.dtype)
        return paged.to_chunk(host, tokens, out)
