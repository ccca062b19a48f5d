"""Carries out controller commands on a worker's cache engine (the agent's logic, no sockets).

Threading: `prepare`, `commit`, `abort` and `sweep` run on the agent's single
ops thread, one at a time; compress/decompress jobs run on the jobs thread
and report through `on_job_done`. The engine does its own locking, so none of
this blocks vLLM's forward pass beyond the engine's short critical sections.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from lmc_connector.cache.engine import CacheEngine, TransformJob
from lmc_connector.cache.errors import UnknownLocationError
from lmc_connector.control import messages as m

logger = logging.getLogger(__name__)

#: Seconds a prepared op outlives its expiry waiting for Commit/Abort before its pins are dropped.
PREPARED_GRACE_S = 30.0


@dataclass(slots=True)
class _Prepared:
    op: m.Op
    job: TransformJob | None
    #: time.monotonic() after which the controller has given up on this op
    deadline: float


class OpExecutor:
    def __init__(
        self,
        engine: CacheEngine,
        methods: list[str],
        on_job_done: Callable[[str, TransformJob], None],
    ) -> None:
        self._engine = engine
        self._methods = methods
        self._on_job_done = on_job_done
        self._prepared: dict[str, _Prepared] = {}
        self._jobs = ThreadPoolExecutor(1, thread_name_prefix="lmc-agent-jobs")

    def close(self) -> None:
        self._jobs.shutdown(wait=False, cancel_futures=True)
        for event_id in list(self._prepared):
            self._release(event_id)

    # -- phase one --------------------------------------------------------------------------

    def prepare(self, cmd: m.Prepare, received: float | None = None) -> m.Reply:
        """`received`: time.monotonic() when the command arrived (default: now)."""
        rid = cmd.request_id
        now = time.monotonic()
        received = now if received is None else received
        if cmd.ttl_s is not None:
            deadline = received + cmd.ttl_s
        else:  # a controller older than `ttl_s`: only its wall clock is known
            deadline = now + (cmd.expires_at - time.time())
        if now > deadline:
            return m.Failed(rid, "expired", "the command expired before this worker got to it")
        op = cmd.op
        engine = self._engine
        try:
            job = None
            if isinstance(op, m.TransformOp):
                if op.method not in self._methods:
                    valid = ", ".join(self._methods) or "none"
                    return m.Failed(
                        rid, "unknown_method", f"unknown method '{op.method}'; valid: {valid}"
                    )
                job = engine.schedule(op.kind, op.tokens, op.method, op.location)
            elif isinstance(op, m.PinOp | m.ClearOp) and op.location is not None:
                engine.backend(op.location)
            elif isinstance(op, m.MoveOp):
                engine.backend(op.source)
                engine.backend(op.destination)
        except UnknownLocationError as e:
            return m.Failed(rid, "unknown_location", str(e))
        except ValueError as e:
            return m.Failed(rid, "bad_request", str(e))
        self._release(cmd.event_id)
        self._prepared[cmd.event_id] = _Prepared(op, job, deadline)
        return m.Ok(rid, num_tokens=0 if job is None else job.num_tokens)

    # -- phase two --------------------------------------------------------------------------

    def commit(self, cmd: m.Commit) -> m.Reply:
        rid = cmd.request_id
        prepared = self._prepared.pop(cmd.event_id, None)
        if prepared is None:
            return m.Failed(rid, "unknown_event", f"nothing prepared for event {cmd.event_id}")
        op, engine = prepared.op, self._engine
        try:
            if prepared.job is not None:
                job = prepared.job
                self._jobs.submit(self._run_job, cmd.event_id, job)
                return m.Ok(rid, num_tokens=job.num_tokens)
            if isinstance(op, m.PinOp):
                where = None if op.location is None else [op.location]
                return m.Ok(rid, num_tokens=engine.pin(op.tokens, where))
            if isinstance(op, m.UnpinOp):
                return m.Ok(rid, num_tokens=engine.unpin(op.tokens))
            if isinstance(op, m.ClearOp):
                removed, kept = engine.clear(op.location)
                return m.Ok(rid, removed=removed, kept=kept)
            assert isinstance(op, m.MoveOp)
            return m.Ok(rid, num_tokens=engine.move(op.tokens, op.source, op.destination))
        except (ValueError, OSError) as e:
            return m.Failed(rid, "bad_request", f"{type(e).__name__}: {e}")

    def abort(self, cmd: m.Abort) -> m.Reply:
        self._release(cmd.event_id)
        return m.Ok(cmd.request_id)

    def sweep(self) -> None:
        """Drop prepared ops nobody committed or aborted (the controller gave up on them)."""
        now = time.monotonic()
        for event_id, prepared in list(self._prepared.items()):
            if now > prepared.deadline + PREPARED_GRACE_S:
                logger.warning("event %s was prepared but never committed: dropped", event_id)
                self._release(event_id)

    def _release(self, event_id: str) -> None:
        prepared = self._prepared.pop(event_id, None)
        if prepared is not None and prepared.job is not None:
            self._engine.unpin_keys(prepared.job.keys)

    def _run_job(self, event_id: str, job: TransformJob) -> None:
        try:
            self._engine.run(job)
        except Exception as e:  # boundary: this job fails and is reported; the agent lives on
            logger.exception("%s job of event %s crashed", job.kind, event_id)
            job.errors.append(f"{type(e).__name__}: {e}")
        rate = job.bytes_before / job.seconds / 1e6 if job.seconds > 0 else 0.0
        logger.info(
            "%s with %s, event %s: %d chunks done, %d skipped, %.1f MB -> %.1f MB in %.2f s "
            "(%.0f MB/s)%s",
            job.kind,
            job.method,
            event_id,
            job.chunks_done,
            job.chunks_skipped,
            job.bytes_before / 1e6,
            job.bytes_after / 1e6,
            job.seconds,
            rate,
            f"; errors: {job.errors}" if job.errors else "",
        )
        self._on_job_done(event_id, job)
