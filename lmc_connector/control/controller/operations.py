"""Tracked operations: what the HTTP API reports under an `event_id`.

An operation has one part per worker of its instance. Status moves
pending -> running -> finished | failed and never back; a part that ends
after its operation failed (a late completion) is recorded but does not
revive it. Operations still in progress expire after `max_active_s` and at
most `max_active` run at once (the oldest fails first); ended ones are kept
for `check_finish` up to `max_ended`, oldest forgotten first. None of this
scans: every table is ordered by age.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Literal

import msgspec

from lmc_connector.control.controller.errors import UnknownOperationError
from lmc_connector.control.controller.histogram import KindHistogram
from lmc_connector.operations import TRANSFORM_KINDS, JobOutcome

Status = Literal["pending", "running", "finished", "failed"]
TERMINAL: frozenset[str] = frozenset({"finished", "failed"})
#: Ended operations kept for /check_finish.
MAX_ENDED = 10_000
#: Operations in progress at once; beyond it the oldest is failed.
MAX_ACTIVE = 10_000
#: Seconds an operation may stay in progress before it is failed as lost.
MAX_ACTIVE_S = 6 * 3600.0


class OperationPart(JobOutcome, kw_only=True, omit_defaults=False):
    """One worker's share of an operation, as /events/{event_id} shows it: every field,
    zeros included (the wire's JobOutcome leaves those out)."""

    rank: int
    status: Status = "pending"


class Operation(msgspec.Struct, kw_only=True):
    """One tracked operation; `num_tokens` is the minimum over its parts."""

    event_id: str
    kind: str
    instance_id: str | None
    #: The codec a compress, decompress or calibrate named.
    method: str | None = None
    status: Status = "pending"
    num_tokens: int = 0
    created_at: float
    finished_at: float | None = None
    error: str | None = None
    workers: list[OperationPart] = []

    def part(self, rank: int) -> OperationPart | None:
        return next((p for p in self.workers if p.rank == rank), None)


def new_event_id() -> str:
    return uuid.uuid4().hex


class OperationStore:
    """Every operation by id, those in progress in creation order, ended ones in end order.

    Not thread-safe: the owning `ControllerState` serialises access.
    """

    def __init__(
        self,
        max_ended: int = MAX_ENDED,
        max_active: int = MAX_ACTIVE,
        max_active_s: float = MAX_ACTIVE_S,
    ) -> None:
        self._max_ended = max_ended
        self._max_active = max_active
        self._max_active_s = max_active_s
        self._active: OrderedDict[str, tuple[float, Operation]] = OrderedDict()
        self._ended: OrderedDict[str, Operation] = OrderedDict()
        #: (kind, status) -> operations that ended with that status
        self.totals: dict[tuple[str, str], int] = {}
        #: Seconds of work each worker's compress/decompress job reported (the job itself).
        self.job_seconds = KindHistogram()
        #: kind -> [bytes before, bytes after] summed over the jobs' finished chunks.
        self.job_bytes: dict[str, list[int]] = {}

    def create(self, kind: str, instance_id: str | None, ranks: Iterable[int]) -> Operation:
        op = Operation(
            event_id=new_event_id(),
            kind=kind,
            instance_id=instance_id,
            created_at=time.time(),
            workers=[OperationPart(rank=r) for r in ranks],
        )
        self._active[op.event_id] = (time.monotonic(), op)
        while len(self._active) > self._max_active:
            _, (_, oldest) = next(iter(self._active.items()))
            self.fail(oldest, "expired: too many operations in progress")
        return op

    def get(self, event_id: str) -> Operation:
        op = self.find(event_id)
        if op is None:
            raise UnknownOperationError(event_id)
        return op

    def find(self, event_id: str) -> Operation | None:
        active = self._active.get(event_id)
        return active[1] if active is not None else self._ended.get(event_id)

    def active(self) -> Iterator[Operation]:
        return (op for _, op in list(self._active.values()))

    def counts(self) -> dict[str, int]:
        out = {"pending": 0, "running": 0, "finished": 0, "failed": 0}
        for _, op in self._active.values():
            out[op.status] += 1
        for (_, status), count in self.totals.items():
            out[status] += count
        return out

    def active_counts(self) -> dict[tuple[str, str], int]:
        """(kind, status) -> operations in progress now."""
        out: dict[tuple[str, str], int] = {}
        for _, op in self._active.values():
            out[(op.kind, op.status)] = out.get((op.kind, op.status), 0) + 1
        return out

    def recent(self, limit: int) -> list[Operation]:
        """The newest operations, in progress first, then the last ended."""
        active = [op for _, op in reversed(self._active.values())][:limit]
        ended = list(reversed(self._ended.values()))[: max(0, limit - len(active))]
        return active + ended

    def expire(self, now: float | None = None) -> int:
        """Fail operations in progress for longer than `max_active_s`; returns how many."""
        now = time.monotonic() if now is None else now
        expired = 0
        while self._active:
            started, op = next(iter(self._active.values()))
            if now - started <= self._max_active_s:
                break
            self.fail(op, f"expired: still {op.status} after {self._max_active_s:g} s")
            expired += 1
        return expired

    def start(self, op: Operation) -> None:
        """All workers accepted: the operation runs (synchronous ops end right after)."""
        if op.status == "pending":
            op.status = "running"
            for part in op.workers:
                if part.status == "pending":
                    part.status = "running"
            self._settle(op)

    def finish_part(
        self, op: Operation, rank: int, error: str | None = None, outcome: JobOutcome | None = None
    ) -> OperationPart | None:
        """End one worker's part, recording what its job reported."""
        part = op.part(rank)
        if part is None or part.status in TERMINAL:
            return part
        if outcome is not None:
            for name in JobOutcome.__struct_fields__:
                setattr(part, name, getattr(outcome, name))
            if op.kind in TRANSFORM_KINDS:
                self.job_seconds.observe(op.kind, outcome.seconds)
                totals = self.job_bytes.setdefault(op.kind, [0, 0])
                totals[0] += outcome.bytes_before
                totals[1] += outcome.bytes_after
        errors = part.errors if error is None else [*part.errors, error]
        part.errors = errors
        part.status = "failed" if errors else "finished"
        self._settle(op)
        return part

    def fail(self, op: Operation, error: str) -> None:
        """End the operation as failed; parts not yet started fail with it, running ones may
        still report their outcome (recorded, without reviving it)."""
        if op.status in TERMINAL:
            return
        for part in op.workers:
            if part.status == "pending":
                part.status = "failed"
                part.errors = part.errors or [error]
        self._end(op, "failed", error)

    def _settle(self, op: Operation) -> None:
        if op.status != "running" or any(p.status not in TERMINAL for p in op.workers):
            return
        failed = [p for p in op.workers if p.status == "failed"]
        if failed:
            errors = "; ".join(f"worker {p.rank}: {'; '.join(p.errors)}" for p in failed)
            self._end(op, "failed", errors)
        else:
            self._end(op, "finished", None)

    def _end(self, op: Operation, status: Status, error: str | None) -> None:
        if op.status in TERMINAL:
            return
        op.status = status
        op.error = error
        op.finished_at = time.time()
        key = (op.kind, status)
        self.totals[key] = self.totals.get(key, 0) + 1
        self._active.pop(op.event_id, None)
        self._ended[op.event_id] = op
        while len(self._ended) > self._max_ended:
            self._ended.popitem(last=False)
