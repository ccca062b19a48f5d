"""Instances and their workers as the controller knows them (pure data, no locking)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from lmc_connector.control import messages as m


class ControlError(ValueError):
    """A request the controller refuses; `status` is the HTTP status to answer with.

    `event_id` names the (failed) event when one was created before the refusal.
    """

    status = 400
    event_id: str | None = None


class WorkerUnavailableError(ControlError):
    """Workers did not answer in time or failed; retry later or check the workers.

    Nothing was applied when it happened in the prepare phase; a failure in the
    commit phase says which workers applied the op and which did not.
    """

    status = 503

    def __init__(self, message: str, event_id: str | None) -> None:
        super().__init__(message)
        self.event_id = event_id


class WorkerRejectedError(ControlError):
    """A worker refused the request (e.g. an unknown location); the message says why."""

    def __init__(self, message: str, event_id: str | None) -> None:
        super().__init__(message)
        self.event_id = event_id


class UnknownInstanceError(ControlError):
    """No registered instance has this id; use one of those listed."""

    status = 404

    def __init__(self, instance_id: str, valid: list[str]) -> None:
        close = difflib.get_close_matches(instance_id, valid, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        listed = ", ".join(sorted(valid)) if valid else "none registered"
        super().__init__(f"unknown instance_id '{instance_id}'{hint}; instances: {listed}")


class InvalidChoiceError(ControlError):
    """A method or location the instance's workers do not offer; use one of those listed."""

    def __init__(self, what: str, value: str, valid: list[str]) -> None:
        close = difflib.get_close_matches(value, valid, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        listed = ", ".join(valid) if valid else "none"
        super().__init__(f"unknown {what} '{value}'{hint}; valid: {listed}")


class InstanceNotReadyError(ControlError):
    """Some tensor-parallel ranks of the instance are not registered; retry when they are."""

    status = 503


@dataclass(slots=True)
class Worker:
    instance_id: str
    rank: int
    session: str
    host: str
    port: int
    model: str
    chunk_size: int
    locations: list[str]
    methods: list[str]
    pid: int
    registered_at: float
    last_seen: float
    usage: dict[str, list[int]] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    @classmethod
    def from_register(cls, msg: m.Register, now: float) -> Worker:
        return cls(
            instance_id=msg.instance_id,
            rank=msg.rank,
            session=msg.session,
            host=msg.host,
            port=msg.port,
            model=msg.model,
            chunk_size=msg.chunk_size,
            locations=list(msg.locations),
            methods=list(msg.methods),
            pid=msg.pid,
            registered_at=now,
            last_seen=now,
        )


@dataclass(slots=True)
class Instance:
    instance_id: str
    model: str
    world_size: int
    chunk_size: int
    workers: dict[int, Worker] = field(default_factory=dict)

    def missing_ranks(self) -> list[int]:
        return [r for r in range(self.world_size) if r not in self.workers]

    def ready_workers(self) -> list[Worker]:
        """Every rank's worker, or InstanceNotReadyError naming the missing ranks."""
        missing = self.missing_ranks()
        if missing:
            raise InstanceNotReadyError(
                f"instance '{self.instance_id}' has {len(self.workers)} of {self.world_size} "
                f"workers registered (missing ranks {missing}); retry once they register"
            )
        return [self.workers[r] for r in range(self.world_size)]

    @property
    def locations(self) -> list[str]:
        """Locations every worker offers, in the first worker's order."""
        workers = list(self.workers.values())
        if not workers:
            return []
        return [loc for loc in workers[0].locations if all(loc in w.locations for w in workers)]

    @property
    def methods(self) -> list[str]:
        workers = list(self.workers.values())
        if not workers:
            return []
        return sorted(set.intersection(*(set(w.methods) for w in workers)))

    def check_location(self, location: str) -> None:
        if location not in self.locations:
            raise InvalidChoiceError("location", location, self.locations)

    def check_method(self, method: str) -> None:
        if method not in self.methods:
            raise InvalidChoiceError("method", method, self.methods)
