"""Instances and their workers as the controller knows them (pure data, no locking)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmc_connector.control.controller.errors import (
    InstanceNotReadyError,
    InvalidChoiceError,
    NotYetError,
)
from lmc_connector.control.wire.monitor import TierReport, WorkerSpec


@dataclass(slots=True)
class Worker:
    """One registered worker: what it said of itself, and when the controller heard from it.

    Times are the controller's `time.monotonic()`; `registered_wall` is its
    wall clock at registration (shown by the API).
    """

    spec: WorkerSpec
    registered_at: float
    registered_wall: float
    last_seen: float
    usage: dict[str, TierReport] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.spec.rank

    @property
    def address(self) -> str:
        return f"tcp://{self.spec.host}:{self.spec.port}"


@dataclass(slots=True)
class Instance:
    """A vLLM deployment: one worker per rank of `world_size`, all of one model and chunk size.

    `world_size` and `chunk_size` are fixed by the first worker to register;
    a worker that disagrees is refused (see `ControllerState`).
    """

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
                f"workers registered (missing ranks {missing[:16]}); retry once they register"
            )
        return [self.workers[r] for r in range(self.world_size)]

    @property
    def locations(self) -> list[str]:
        """Locations every worker offers, in the first worker's order."""
        workers = list(self.workers.values())
        if not workers:
            return []
        first = workers[0].spec.locations
        return [loc for loc in first if all(loc in w.spec.locations for w in workers)]

    @property
    def methods(self) -> list[str]:
        workers = list(self.workers.values())
        if not workers:
            return []
        return sorted(set.intersection(*(set(w.spec.methods) for w in workers)))

    def check_location(self, location: str) -> None:
        if location not in self.locations:
            raise InvalidChoiceError("location", location, self.locations)

    def check_method(self, method: str) -> None:
        if method not in self.methods:
            raise InvalidChoiceError("method", method, self.methods)

    @property
    def calibrated_methods(self) -> list[str]:
        """Methods (offered by every worker) that compress only with a calibration."""
        methods = set(self.methods)
        return sorted(
            {m for w in self.workers.values() for m in w.spec.calibrated_methods} & methods
        )

    def check_calibrates(self, method: str) -> None:
        """InvalidChoiceError unless `method` is one that takes a calibration."""
        if method not in self.calibrated_methods:
            raise InvalidChoiceError(
                "method to calibrate (the others need none)", method, self.calibrated_methods
            )

    def check_calibrated(self, method: str) -> None:
        """NotYetError when `method` needs a calibration that some worker has not got (as far
        as the controller knows: what it registered with and the calibrations it fitted)."""
        if method not in self.calibrated_methods:
            return
        lacking = sorted(r for r, w in self.workers.items() if method not in w.spec.calibrations)
        if lacking:
            raise NotYetError(
                f"{method} needs a calibration, and worker(s) {lacking[:16]} of instance "
                f"'{self.instance_id}' have none yet: calibrate first with POST /calibrate "
                f'{{"instance_id": "{self.instance_id}", "method": "{method}"}} (or '
                f"`lmc-admin calibrate --instance {self.instance_id} --method {method} --wait`), "
                "then compress"
            )
