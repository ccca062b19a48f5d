"""Tracked operations ("events"): what the HTTP API reports under an `event_id`.

An event has one part per worker of its instance. Status moves
pending -> running -> finished | failed and never back; a part that ends
after its event failed (a late completion) is recorded but does not revive
the event. Not thread-safe: the owning `Controller` serialises access.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from typing import Literal

import msgspec

Status = Literal["pending", "running", "finished", "failed"]
TERMINAL: frozenset[str] = frozenset({"finished", "failed"})
#: Finished events kept for /check_finish; older ones are forgotten first. Pending and
#: running events are never dropped.
MAX_FINISHED_EVENTS = 10_000


class WorkerPart(msgspec.Struct, kw_only=True):
    """One worker's share of an event, as /events/{event_id} shows it."""

    rank: int
    status: Status = "pending"
    num_tokens: int = 0
    chunks_done: int = 0
    chunks_skipped: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    removed: int = 0
    kept_pinned: int = 0
    error: str | None = None


class Event(msgspec.Struct, kw_only=True):
    event_id: str
    kind: str
    instance_id: str | None
    status: Status = "pending"
    num_tokens: int = 0
    created_at: float
    finished_at: float | None = None
    error: str | None = None
    workers: list[WorkerPart] = []

    def part(self, rank: int) -> WorkerPart | None:
        return next((p for p in self.workers if p.rank == rank), None)


class UnknownEventError(KeyError):
    """No such event_id (never issued, or forgotten long after it finished)."""


def new_event_id() -> str:
    return uuid.uuid4().hex


class EventStore:
    def __init__(self, max_finished: int = MAX_FINISHED_EVENTS) -> None:
        self._events: OrderedDict[str, Event] = OrderedDict()
        self._max_finished = max_finished
        self._finished = 0
        #: (kind, status) -> events that reached that terminal status
        self.totals: dict[tuple[str, str], int] = {}

    def create(self, kind: str, instance_id: str | None, ranks: Iterable[int]) -> Event:
        event = Event(
            event_id=new_event_id(),
            kind=kind,
            instance_id=instance_id,
            created_at=time.time(),
            workers=[WorkerPart(rank=r) for r in ranks],
        )
        self._events[event.event_id] = event
        return event

    def get(self, event_id: str) -> Event:
        try:
            return self._events[event_id]
        except KeyError:
            raise UnknownEventError(event_id) from None

    def find(self, event_id: str) -> Event | None:
        return self._events.get(event_id)

    def active(self) -> list[Event]:
        return [e for e in self._events.values() if e.status not in TERMINAL]

    def counts(self) -> dict[str, int]:
        out = {"pending": 0, "running": 0, "finished": 0, "failed": 0}
        for event in self._events.values():
            out[event.status] += 1
        return out

    def start(self, event: Event) -> None:
        """All workers accepted: the event runs (sync ops finish right after)."""
        if event.status == "pending":
            event.status = "running"
            for part in event.workers:
                if part.status == "pending":
                    part.status = "running"
            self._settle(event)

    def finish_part(self, event: Event, rank: int, error: str | None = None) -> WorkerPart | None:
        part = event.part(rank)
        if part is None or part.status in TERMINAL:
            return part
        part.status = "failed" if error else "finished"
        part.error = error
        self._settle(event)
        return part

    def fail(self, event: Event, error: str) -> None:
        """End the event as failed; parts not yet started fail with it, running ones may
        still report their outcome (recorded, without reviving the event)."""
        if event.status in TERMINAL:
            return
        for part in event.workers:
            if part.status == "pending":
                part.status = "failed"
                part.error = part.error or error
        self._end(event, "failed", error)

    def finish(self, event: Event) -> None:
        self._end(event, "finished", None)

    def _settle(self, event: Event) -> None:
        if event.status != "running" or any(p.status not in TERMINAL for p in event.workers):
            return
        failed = [p for p in event.workers if p.status == "failed"]
        if failed:
            errors = "; ".join(f"worker {p.rank}: {p.error}" for p in failed)
            self._end(event, "failed", errors)
        else:
            self._end(event, "finished", None)

    def _end(self, event: Event, status: Status, error: str | None) -> None:
        if event.status in TERMINAL:
            return
        event.status = status
        event.error = error
        event.finished_at = time.time()
        key = (event.kind, status)
        self.totals[key] = self.totals.get(key, 0) + 1
        self._finished += 1
        if self._finished > self._max_finished:
            self._forget_oldest()

    def _forget_oldest(self) -> None:
        excess = self._finished - self._max_finished
        victims: list[str] = []
        for event_id, event in self._events.items():
            if len(victims) >= excess:
                break
            if event.status in TERMINAL:
                victims.append(event_id)
        for event_id in victims:
            del self._events[event_id]
        self._finished -= len(victims)
