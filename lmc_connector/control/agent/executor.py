"""Carries out the controller's commands on a worker's cache engine (no sockets).

Threading: `prepare`, `commit`, `abort` and `sweep` run on the agent's single
ops thread, one at a time; compress/decompress jobs, calibrations and pulls run
on the jobs thread and report through `on_job_done`. The engine does its own locking, so none of
this blocks vLLM's forward pass beyond the engine's short critical sections.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from lmc_connector.cache import CacheEngine, TransformJob, UnknownLocationError
from lmc_connector.cache.calibrate import CalibrationJob
from lmc_connector.cache.errors import NotCalibratedError, NotEnoughKVError
from lmc_connector.control.agent.peer_client import PeerClient
from lmc_connector.control.agent.pull import pull
from lmc_connector.control.wire import commands as cmd
from lmc_connector.control.wire.types import prompt_of
from lmc_connector.operations import JobOutcome
from lmc_connector.throttle import Throttle

logger = logging.getLogger(__name__)

#: Seconds a prepared op outlives its TTL waiting for Commit/Abort before its pins are dropped.
PREPARED_GRACE_S = 30.0
#: Operations held prepared at once, and by one connection. Beyond either, the oldest of the
#: connection holding the most is dropped (its pins released): a flood of prepares nobody
#: commits can neither grow the worker nor push out the controller's, which it commits at once.
MAX_PREPARED = 1024
MAX_PREPARED_PER_PEER = 256
#: Seconds between two warnings about prepared operations dropped for room.
DROPPED_LOG_EVERY_S = 10.0


@dataclass(slots=True)
class _Prepared:
    op: cmd.Op
    job: TransformJob | CalibrationJob | None
    #: time.monotonic() after which the controller has given up on this op
    deadline: float
    #: the connection that prepared it
    owner: bytes


class OpExecutor:
    """Owns the ops prepared but not yet committed (bounded) and the jobs thread.

    Called on the agent's ops thread; reports finished jobs through `on_job_done`
    from the jobs thread. `peers` fetches from other instances (None: enable_p2p is off,
    so `/move` across instances is refused); `rank` picks this worker's source of a pull.
    """

    def __init__(
        self,
        engine: CacheEngine,
        methods: list[str],
        on_job_done: Callable[[str, JobOutcome], None],
        peers: PeerClient | None = None,
        rank: int = 0,
    ) -> None:
        self._engine = engine
        self._methods = methods
        self._on_job_done = on_job_done
        self._peers = peers
        self._rank = rank
        self._prepared: OrderedDict[str, _Prepared] = OrderedDict()
        self._jobs = ThreadPoolExecutor(1, thread_name_prefix="lmc-agent-jobs")
        self._dropped = 0
        self._dropped_log = Throttle(DROPPED_LOG_EVERY_S)

    def close(self) -> None:
        self._jobs.shutdown(wait=False, cancel_futures=True)
        for event_id in list(self._prepared):
            self._release(event_id)

    # -- phase one --------------------------------------------------------------------------

    def prepare(
        self, prepare: cmd.Prepare, received: float | None = None, owner: bytes = b""
    ) -> cmd.Reply:
        """`received`: time.monotonic() when the command arrived (default: now); `owner`: the
        connection it came from."""
        now = time.monotonic()
        deadline = (now if received is None else received) + prepare.ttl_s
        if now > deadline:
            return cmd.Failed("expired", "the command expired before this worker got to it")
        self.sweep(now)
        op, engine = prepare.op, self._engine
        try:
            job: TransformJob | CalibrationJob | None = None
            if isinstance(op, cmd.TransformOp):
                if op.method not in self._methods:
                    valid = ", ".join(self._methods) or "none"
                    return cmd.Failed(
                        "unknown_method", f"unknown method '{op.method}'; valid: {valid}"
                    )
                which = None if op.every_chunk else prompt_of(op.tokens, op.scope)
                job = engine.schedule(op.kind, which, op.method, op.location)
            elif isinstance(op, cmd.CalibrateOp):
                job = engine.schedule_calibration(op.method)
            elif isinstance(op, cmd.PinOp | cmd.ClearOp) and op.location is not None:
                engine.tier(op.location)
            elif isinstance(op, cmd.MoveOp):
                engine.tier(op.source)
                engine.tier(op.destination)
            elif isinstance(op, cmd.PullOp):
                refused = self._check_pull(op)
                if refused is not None:
                    return refused
        except UnknownLocationError as e:
            return cmd.Failed("unknown_location", str(e))
        except (NotCalibratedError, NotEnoughKVError) as e:
            return cmd.Failed("conflict", str(e))
        except ValueError as e:
            return cmd.Failed("bad_request", str(e))
        self._release(prepare.event_id)
        self._make_room(owner)
        self._prepared[prepare.event_id] = _Prepared(op, job, deadline, owner)
        tokens = 0 if job is None else job.outcome.num_tokens
        if isinstance(op, cmd.PullOp):
            tokens = op.num_tokens
        return cmd.Ok(JobOutcome(num_tokens=tokens))

    def _check_pull(self, op: cmd.PullOp) -> cmd.Failed | None:
        self._engine.tier(op.location)
        if self._peers is None:
            return cmd.Failed(
                "bad_request", "this instance fetches from no peers: set enable_p2p: true"
            )
        if self._rank >= len(op.sources):
            return cmd.Failed(
                "bad_request", f"the source has {len(op.sources)} ranks, this is rank {self._rank}"
            )
        return None

    # -- phase two --------------------------------------------------------------------------

    def commit(self, commit: cmd.Commit) -> cmd.Reply:
        prepared = self._prepared.pop(commit.event_id, None)
        if prepared is None:
            return cmd.Failed("unknown_event", f"nothing prepared for event {commit.event_id}")
        op, engine = prepared.op, self._engine
        try:
            job = prepared.job
            if isinstance(job, CalibrationJob):
                self._jobs.submit(self._run_calibration, commit.event_id, job)
            elif job is not None:
                self._jobs.submit(self._run_job, commit.event_id, job)
            if job is not None:
                return cmd.Ok(JobOutcome(num_tokens=job.outcome.num_tokens))
            if isinstance(op, cmd.PullOp):
                self._jobs.submit(self._run_pull, commit.event_id, op)
                return cmd.Ok(JobOutcome(num_tokens=op.num_tokens))
            if isinstance(op, cmd.PinOp):
                where = None if op.location is None else [op.location]
                pinned = engine.pin(prompt_of(op.tokens, op.scope), where)
                return cmd.Ok(JobOutcome(num_tokens=pinned))
            if isinstance(op, cmd.UnpinOp):
                unpinned = engine.unpin(prompt_of(op.tokens, op.scope))
                return cmd.Ok(JobOutcome(num_tokens=unpinned))
            if isinstance(op, cmd.ClearOp):
                cleared = engine.clear(op.location)
                return cmd.Ok(
                    JobOutcome(
                        num_tokens=cleared.num_tokens, removed=cleared.removed, kept=cleared.kept
                    )
                )
            assert isinstance(op, cmd.MoveOp)
            moved = engine.move(prompt_of(op.tokens, op.scope), op.source, op.destination)
            return cmd.Ok(JobOutcome(num_tokens=moved))
        except (ValueError, OSError) as e:
            return cmd.Failed("bad_request", f"{type(e).__name__}: {e}")

    def abort(self, abort: cmd.Abort) -> cmd.Reply:
        self._release(abort.event_id)
        return cmd.Ok()

    def sweep(self, now: float | None = None) -> None:
        """Drop prepared ops nobody committed or aborted (the controller gave up on them)."""
        now = time.monotonic() if now is None else now
        stale = [e for e, p in self._prepared.items() if now > p.deadline + PREPARED_GRACE_S]
        for event_id in stale:
            self._release(event_id)
        if stale:
            logger.warning(
                "%d operations were prepared but never committed (e.g. event %s): dropped",
                len(stale),
                stale[0],
            )

    def _make_room(self, owner: bytes) -> None:
        """Drop the oldest op of the connection holding the most when a bound is reached."""
        held = Counter(p.owner for p in self._prepared.values())
        if held[owner] >= MAX_PREPARED_PER_PEER:
            victim = owner
        elif len(self._prepared) >= MAX_PREPARED:
            victim = held.most_common(1)[0][0]
        else:
            return
        self._release(next(e for e, p in self._prepared.items() if p.owner == victim))
        self._dropped += 1
        if self._dropped_log.ready():
            logger.warning(
                "too many operations prepared but not committed (%d): dropped the oldest of the "
                "connection holding the most (%d so far)",
                len(self._prepared),
                self._dropped,
            )

    def _release(self, event_id: str) -> None:
        prepared = self._prepared.pop(event_id, None)
        if prepared is not None and prepared.job is not None:
            self._engine.release(prepared.job)

    def _run_pull(self, event_id: str, op: cmd.PullOp) -> None:
        assert self._peers is not None
        try:
            outcome = pull(self._engine, self._peers, op, self._rank)
        except Exception as e:  # boundary: this pull fails and is reported; the agent lives on
            logger.exception("pull of event %s crashed", event_id)
            outcome = JobOutcome(errors=[f"{type(e).__name__}: {e}"])
        self._on_job_done(event_id, outcome)

    def _run_calibration(self, event_id: str, job: CalibrationJob) -> None:
        try:
            self._engine.calibrate(job)
        except ValueError as e:  # too few samples left, or the fit refused them
            logger.error("calibration of %s, event %s, failed: %s", job.method, event_id, e)
            job.outcome.errors.append(str(e))
        except Exception as e:  # boundary: this calibration fails and is reported
            logger.exception("calibration of %s, event %s, crashed", job.method, event_id)
            job.outcome.errors.append(f"{type(e).__name__}: {e}")
        self._on_job_done(event_id, job.outcome)

    def _run_job(self, event_id: str, job: TransformJob) -> None:
        outcome = job.outcome
        try:
            self._engine.run(job)
        except Exception as e:  # boundary: this job fails and is reported; the agent lives on
            logger.exception("%s job of event %s crashed", job.kind, event_id)
            outcome.errors.append(f"{type(e).__name__}: {e}")
        rate = outcome.bytes_before / outcome.seconds / 1e6 if outcome.seconds > 0 else 0.0
        logger.info(
            "%s with %s, event %s: %d chunks done, %d skipped, %.1f MB -> %.1f MB in %.2f s "
            "(%.0f MB/s)%s",
            job.kind,
            job.method,
            event_id,
            outcome.chunks_done,
            outcome.chunks_skipped,
            outcome.bytes_before / 1e6,
            outcome.bytes_after / 1e6,
            outcome.seconds,
            rate,
            f"; errors: {outcome.errors}" if outcome.errors else "",
        )
        self._on_job_done(event_id, outcome)
