"""The controller service: state, the ZMQ loops, and two-phase commands to workers.

Every worker command runs in two phases. Prepare asks each worker of the
instance to validate the op (a compress/decompress also pins its chunks and
counts the tokens it covers) without changing anything; only when every
worker answered yes does Commit carry it out. A worker that does not answer
in time, or refuses, fails the event in the prepare phase and the others
abort: nothing was changed. Commit is not atomic across workers: when it
fails on some worker, the others have applied the op (it is not rolled
back), and the event's error says which workers applied it and which did not.

The controller's lock is only ever taken in a worker thread (`asyncio.to_thread`),
never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import NoReturn

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

#: Seconds past the command timeout after which a phase stops waiting for the command
#: thread itself (which settles every request by its deadline; this is the backstop).
ASK_MARGIN_S = 1.0
#: Failure codes that mean "the worker could not take part", not "the request is wrong".
UNAVAILABLE_CODES = ("expired", "internal")


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


def _settled(waiter: asyncio.Future[m.Reply]) -> m.Reply | BaseException:
    if not waiter.done() or waiter.cancelled():
        return CommandTimeout("the command thread did not settle the request")
    return waiter.exception() or waiter.result()


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks)) or "none"


class ControllerService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        monitor_url = tcp_url(settings.host, settings.monitor_port)  # ValueError: unknown host
        self.controller = Controller(settings.worker_timeout)
        self.latency = LatencyHistogram()
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.commands = CommandLoop(self._context)
        self.monitor = MonitorLoop(
            self._context,
            self.controller,
            monitor_url,
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
        """Each worker's reply, or the exception standing for it; returns by the deadline."""
        timeout = self.settings.command_timeout
        futures: list[Future[m.Reply]] = [
            self.commands.request(w.address, build, timeout) for w in workers
        ]
        waiters = [asyncio.wrap_future(f) for f in futures]
        try:
            return await asyncio.wait_for(
                asyncio.gather(*waiters, return_exceptions=True), timeout + ASK_MARGIN_S
            )
        except TimeoutError:
            logger.error("the command thread missed its deadline; counting the workers as silent")
            return [_settled(w) for w in waiters]

    async def run(
        self, kind: str, instance_id: str, op: m.Op, check: Callable[[Instance], None]
    ) -> Event:
        """Run `op` on every worker of the instance; raises ControlError subclasses."""
        started = time.perf_counter()
        workers, event = await asyncio.to_thread(self._begin, kind, instance_id, check)
        event_id = event.event_id
        ttl = self.settings.command_timeout
        expires_at = time.time() + ttl  # for workers older than `ttl_s`

        prepared = await self._ask(
            workers, lambda rid: m.Prepare(rid, event_id, op, expires_at, ttl_s=ttl)
        )
        problems = [(w, _outcome(r), r) for w, r in zip(workers, prepared, strict=True)]
        if any(why for _, why, _ in problems):
            for worker, _, reply in problems:
                # A silent worker may still prepare later: the Abort queued behind the
                # Prepare releases what it pinned. A Failed one holds nothing.
                if not isinstance(reply, m.Failed):
                    self.commands.request(
                        worker.address,
                        lambda rid: m.Abort(rid, event_id),
                        self.settings.command_timeout,
                    )
            await asyncio.to_thread(self._refuse, event, problems, started)

        committed = await self._ask(workers, lambda rid: m.Commit(rid, event_id))
        failed = await asyncio.to_thread(self._record_commit, event, workers, prepared, committed)
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

    def _begin(
        self, kind: str, instance_id: str, check: Callable[[Instance], None]
    ) -> tuple[list[WorkerRef], Event]:
        with self.controller.lock:
            instance = self.controller.instance(instance_id)
            check(instance)
            workers = [WorkerRef(instance_id, w.rank, w.address) for w in instance.ready_workers()]
            event = self.controller.events.create(kind, instance_id, [w.rank for w in workers])
        return workers, event

    def _record_commit(
        self,
        event: Event,
        workers: list[WorkerRef],
        prepared: list[m.Reply | BaseException],
        committed: list[m.Reply | BaseException],
    ) -> bool:
        """Record each worker's commit outcome on the event; True if the event failed."""
        kind, events = event.kind, self.controller.events
        applied: list[int] = []
        refused: list[str] = []
        with self.controller.lock:
            for worker, before, after in zip(workers, prepared, committed, strict=True):
                part = event.part(worker.rank)
                assert part is not None and isinstance(before, m.Ok)
                why = _outcome(after)
                if why is not None:
                    refused.append(f"worker {worker.rank}: {why}")
                    events.finish_part(event, worker.rank, why)
                    continue
                assert isinstance(after, m.Ok)
                applied.append(worker.rank)
                part.num_tokens = (
                    before.num_tokens if kind in m.TRANSFORM_KINDS else after.num_tokens
                )
                part.removed, part.kept_pinned = after.removed, after.kept
                if kind not in m.TRANSFORM_KINDS:
                    events.finish_part(event, worker.rank)
            event.num_tokens = min(p.num_tokens for p in event.workers)
            events.start(event)
            if refused:
                # A worker that answered Failed did not apply it; one that did not answer may
                # still apply the queued commit later.
                said_no = [w.rank for w, r in zip(workers, committed, strict=True)
                           if isinstance(r, m.Failed)]  # fmt: skip
                unknown = [
                    w.rank for w in workers if w.rank not in applied and w.rank not in said_no
                ]
                error = (
                    f"commit failed ({'; '.join(refused)}): applied on worker(s) "
                    f"{_ranks(applied)}, not on worker(s) {_ranks(said_no)}, unknown on "
                    f"worker(s) {_ranks(unknown)}; it is not rolled back"
                )
                events.fail(event, error)  # running parts may still report their outcome
                event.error = error  # also when the last part's failure already ended it
            return event.status == "failed"

    def _refuse(
        self,
        event: Event,
        problems: list[tuple[WorkerRef, str | None, m.Reply | BaseException]],
        started: float,
    ) -> NoReturn:
        """Fail the event after the prepare phase (nothing was changed) and raise why."""
        errors = "; ".join(f"worker {w.rank}: {why}" for w, why, _ in problems if why)
        unavailable = any(
            not isinstance(r, m.Ok | m.Failed)
            or (isinstance(r, m.Failed) and r.code in UNAVAILABLE_CODES)
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
        if unavailable:
            raise WorkerUnavailableError(
                f"workers failed or did not answer within {self.settings.command_timeout:g} s, "
                f"nothing was changed: {errors}",
                event.event_id,
            )
        raise WorkerRejectedError(f"{errors}; nothing was changed", event.event_id)
