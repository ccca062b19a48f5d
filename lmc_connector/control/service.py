"""The controller service: state, the ZMQ loops, and two-phase commands to workers.

Every worker command runs in two phases. Prepare asks each worker of the
instance to validate the op (a compress/decompress also pins its chunks and
counts the tokens it covers) without changing anything; only when every
worker answered yes does Commit carry it out. A worker that does not answer
in time fails the event with 503 and the others abort, so the cache is left
as it was.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import zmq

from lmc_connector.control import messages as m
from lmc_connector.control.commands import CommandLoop, CommandSendError, CommandTimeout
from lmc_connector.control.controller import Controller, WorkerRef
from lmc_connector.control.events import Event
from lmc_connector.control.metrics import LatencyHistogram
from lmc_connector.control.monitor import MonitorLoop
from lmc_connector.control.registry import (
    Instance,
    WorkerRejectedError,
    WorkerUnavailableError,
)
from lmc_connector.control.transport import tcp_url

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 9000
    monitor_port: int = 9001
    #: Bearer token the HTTP API requires; None leaves the API open.
    api_key: str | None = None
    #: Seconds without a heartbeat before a worker and its chunks are dropped.
    worker_timeout: float = 10.0
    #: Seconds each worker has to answer one command phase.
    command_timeout: float = 5.0
    log_level: str = "info"


def _outcome(result: m.Reply | BaseException) -> str | None:
    """None for success, else why this worker's answer does not count."""
    if isinstance(result, m.Ok):
        return None
    if isinstance(result, m.Failed):
        return result.error
    if isinstance(result, CommandTimeout | CommandSendError):
        return f"no answer ({result})"
    return f"{type(result).__name__}: {result}"


class ControllerService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.controller = Controller(settings.worker_timeout)
        self.latency = LatencyHistogram()
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.commands = CommandLoop(self._context)
        self.monitor = MonitorLoop(
            self._context,
            self.controller,
            tcp_url(settings.host, settings.monitor_port),
            on_resync=self.resync,
            on_gone=lambda ref: self.commands.forget(ref.address),
        )

    def start(self) -> None:
        self.commands.start()
        self.monitor.start()
        logger.info(
            "controller monitoring workers on %s:%d (worker timeout %.1f s)",
            self.settings.host,
            self.settings.monitor_port,
            self.settings.worker_timeout,
        )

    def close(self) -> None:
        self.monitor.close()
        self.commands.close()
        self._context.term()

    def resync(self, ref: WorkerRef) -> None:
        """Ask a worker the controller does not know to register and resend its chunks."""
        self.commands.request(ref.address, m.Resync, self.settings.command_timeout)

    # -- two-phase commands -----------------------------------------------------------------

    async def _ask(
        self, workers: list[WorkerRef], build: Callable[[int], m.Command]
    ) -> list[m.Reply | BaseException]:
        timeout = self.settings.command_timeout
        futures: list[Future[m.Reply]] = [
            self.commands.request(w.address, build, timeout) for w in workers
        ]
        return await asyncio.gather(
            *(asyncio.wrap_future(f) for f in futures), return_exceptions=True
        )

    async def run(
        self, kind: str, instance_id: str, op: m.Op, check: Callable[[Instance], None]
    ) -> Event:
        """Run `op` on every worker of the instance; raises ControlError subclasses."""
        started = time.perf_counter()
        controller = self.controller
        with controller.lock:
            instance = controller.instance(instance_id)
            check(instance)
            workers = [WorkerRef(instance_id, w.rank, w.address) for w in instance.ready_workers()]
            event = controller.events.create(kind, instance_id, [w.rank for w in workers])
        event_id = event.event_id
        expires_at = time.time() + self.settings.command_timeout

        prepared = await self._ask(workers, lambda rid: m.Prepare(rid, event_id, op, expires_at))
        problems = [(w, _outcome(r), r) for w, r in zip(workers, prepared, strict=True)]
        if any(why for _, why, _ in problems):
            for worker, why, _ in problems:
                if why is None:
                    self.commands.request(
                        worker.address,
                        lambda rid: m.Abort(rid, event_id),
                        self.settings.command_timeout,
                    )
            self._refuse(event, problems, started)

        committed = await self._ask(workers, lambda rid: m.Commit(rid, event_id))
        with controller.lock:
            for worker, before, after in zip(workers, prepared, committed, strict=True):
                part = event.part(worker.rank)
                assert part is not None and isinstance(before, m.Ok)
                why = _outcome(after)
                if why is not None:
                    controller.events.finish_part(event, worker.rank, why)
                    continue
                assert isinstance(after, m.Ok)
                part.num_tokens = (
                    before.num_tokens if kind in m.TRANSFORM_KINDS else after.num_tokens
                )
                part.removed, part.kept_pinned = after.removed, after.kept
                if kind not in m.TRANSFORM_KINDS:
                    controller.events.finish_part(event, worker.rank)
            event.num_tokens = min(p.num_tokens for p in event.workers)
            controller.events.start(event)
            failed = event.status == "failed"
        elapsed = time.perf_counter() - started
        self.latency.observe(kind, elapsed)
        logger.info(
            "%s on %s (%d workers): %d tokens, event %s %s, %.1f ms",
            kind,
            instance_id,
            len(workers),
            event.num_tokens,
            event_id,
            event.status,
            elapsed * 1000,
        )
        if failed:
            raise WorkerUnavailableError(
                f"{kind} failed on instance '{instance_id}': {event.error}", event_id
            )
        return event

    def _refuse(
        self,
        event: Event,
        problems: list[tuple[WorkerRef, str | None, m.Reply | BaseException]],
        started: float,
    ) -> None:
        errors = "; ".join(f"worker {w.rank}: {why}" for w, why, _ in problems if why)
        timed_out = any(
            not isinstance(r, m.Ok | m.Failed) or (isinstance(r, m.Failed) and r.code == "expired")
            for _, why, r in problems
            if why
        )
        with self.controller.lock:
            for worker, why, _ in problems:
                if why:
                    self.controller.events.finish_part(event, worker.rank, why)
            self.controller.events.fail(event, errors)
        self.latency.observe(event.kind, time.perf_counter() - started)
        logger.warning(
            "%s on %s refused, event %s: %s", event.kind, event.instance_id, event.event_id, errors
        )
        if timed_out:
            raise WorkerUnavailableError(
                f"workers did not answer within {self.settings.command_timeout:g} s, nothing was "
                f"changed: {errors}",
                event.event_id,
            )
        raise WorkerRejectedError(errors, event.event_id)
