"""The controller service: its state, its threads, and two-phase operations on workers.

Every operation runs in two phases. Prepare asks each worker of the instance
to validate the op (a compress/decompress also pins its chunks and counts
the tokens it covers) without changing anything; only when every worker
answered yes does Commit carry it out. A worker that does not answer in
time, or refuses, fails the operation in the prepare phase and the others
abort: nothing was changed. Commit is not atomic across workers: when it
fails on some worker, the others have applied the op (it is not rolled
back), and the operation's error says which workers applied it and which
did not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import NoReturn

import zmq

from lmc_connector.control.controller.errors import (
    NotYetError,
    WorkerRejectedError,
    WorkerUnavailableError,
)
from lmc_connector.control.controller.histogram import KindHistogram
from lmc_connector.control.controller.instances import Instance
from lmc_connector.control.controller.locate import LocateServer
from lmc_connector.control.controller.metrics import build_registry
from lmc_connector.control.controller.monitor import MonitorLoop
from lmc_connector.control.controller.operations import Operation
from lmc_connector.control.controller.settings import Settings
from lmc_connector.control.controller.state import ControllerState, Notice, WorkerRef
from lmc_connector.control.wire import commands as cmd
from lmc_connector.control.wire.codec import MessageError, encode
from lmc_connector.control.wire.rpc import RpcClient, RpcError
from lmc_connector.control.wire.security import ChannelSecurity
from lmc_connector.control.wire.sockets import RateLimit, tcp_url
from lmc_connector.operations import TRANSFORM_KINDS

logger = logging.getLogger(__name__)

#: Seconds past the command timeout after which a phase stops waiting for the client thread
#: itself (which settles every request by its deadline; this is the backstop).
ASK_MARGIN_S = 1.0
#: Failure codes that mean "the worker could not take part", not "the request is wrong".
UNAVAILABLE_CODES = ("expired", "busy", "internal")
#: Notifications (registration answers, resync requests) sent per second at most, each to
#: its own address: bounds the sockets that forged reports naming endless addresses can
#: make the controller open (and still flush) at once. A worker whose notice is dropped
#: asks again (it re-registers, or heartbeats).
NOTICES_PER_S = 500

Answer = cmd.Reply | BaseException


def _outcome(answer: Answer) -> str | None:
    """None for success, else why this worker's answer does not count."""
    if isinstance(answer, cmd.Ok):
        return None
    if isinstance(answer, cmd.Failed):
        return answer.error
    if isinstance(answer, RpcError):
        return f"no answer ({answer})"
    return f"{type(answer).__name__}: {answer}"


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks)) or "none"


class ControllerService:
    """Owns the controller's state, its ZMQ context and threads (monitor, command client).

    `run` is called by HTTP handlers on the event loop; it takes the state's
    lock only in worker threads (`asyncio.to_thread`), never on the loop.
    `security` (from the settings' secret file when not given) secures the
    monitor, command and reply (locate) channels. Construct, `start`, `close`.
    """

    def __init__(self, settings: Settings, security: ChannelSecurity | None = None) -> None:
        self.settings = settings
        monitor_url = tcp_url(settings.host, settings.monitor_port)  # ValueError: unknown host
        if security is None:  # SecretError: the file became unreadable since the settings
            security = ChannelSecurity.from_file(settings.secret_file, insecure=settings.insecure)
        self.security = security
        self.state = ControllerState(settings.worker_timeout, settings.max_indexed_chunks)
        self.latency = KindHistogram()
        self.metrics = build_registry(self.state, self.latency)
        self._notices = RateLimit(NOTICES_PER_S, NOTICES_PER_S)
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.commands = RpcClient(self._context, "commands", security)
        self._replies = cmd.reply_decoder()
        self.monitor = MonitorLoop(
            self._context,
            self.state,
            monitor_url,
            security,
            on_notice=self.notify,
            on_gone=lambda ref: self.commands.forget(ref.address),
        )
        self.locate: LocateServer | None = None
        if settings.reply_port is not None:
            reply_url = tcp_url(settings.host, settings.reply_port)
            self.locate = LocateServer(self._context, self.state, reply_url, security)

    def start(self) -> None:
        """Bind the monitor and reply ports (raises zmq.ZMQError if taken, InsecureBindError if
        one would be exposed without a secret) and start the threads."""
        self.monitor.start()
        if self.locate is not None:
            self.locate.start()
        self.commands.start()
        logger.info(
            "controller monitoring workers on %s:%d (worker timeout %.1f s; %s)",
            self.settings.host,
            self.settings.monitor_port,
            self.settings.worker_timeout,
            self.security.describe(),
        )

    def close(self) -> None:
        self.monitor.close()
        if self.locate is not None:
            self.locate.close()
        self.commands.close()
        self._context.term()

    def dead_threads(self) -> list[str]:
        """Internal threads that stopped although the service runs (health reports them)."""
        threads = {"monitor": self.monitor.alive, "commands": self.commands.alive}
        if self.locate is not None:
            threads["locate"] = self.locate.alive
        return [name for name, alive in threads.items() if not alive]

    def notify(self, notice: Notice) -> None:
        """Send a notification (resync request, registration answer) to a worker's command port
        (monitor thread); dropped beyond `NOTICES_PER_S`."""
        ref, command = notice
        if self._notices.take():
            self.commands.notify(ref.address, [encode(command)])

    # -- two-phase operations -----------------------------------------------------------------

    def _send(self, worker: WorkerRef, command: cmd.Command) -> Future[cmd.Reply]:
        """Send one command; the future resolves to the decoded reply."""
        raw = self.commands.request(
            worker.address, [encode(command)], self.settings.command_timeout
        )
        decoded: Future[cmd.Reply] = Future()

        def done(f: Future[list[zmq.Frame]]) -> None:
            try:
                decoded.set_result(self._replies.decode(f.result()[0].buffer))
            except (RpcError, MessageError, IndexError) as e:
                decoded.set_exception(e)

        raw.add_done_callback(done)
        return decoded

    async def _ask(self, workers: list[WorkerRef], command: cmd.Command) -> list[Answer]:
        """Each worker's reply, or the exception standing for it; returns by the deadline."""
        waiters = [asyncio.wrap_future(self._send(w, command)) for w in workers]
        try:
            return await asyncio.wait_for(
                asyncio.gather(*waiters, return_exceptions=True),
                self.settings.command_timeout + ASK_MARGIN_S,
            )
        except TimeoutError:
            logger.error("the command thread missed its deadline; counting the workers as silent")
            return [
                w.exception() or w.result() if w.done() and not w.cancelled() else TimeoutError()
                for w in waiters
            ]

    async def run(
        self,
        kind: str,
        instance_id: str,
        op: cmd.Op,
        check: Callable[[Instance], None],
        background: bool | None = None,
    ) -> Operation:
        """Run `op` on every worker of the instance; raises ControlError subclasses.

        A `background` op (transforms by default) goes on running on the workers after the
        commit; each one's part ends with its job's outcome."""
        if background is None:
            background = kind in TRANSFORM_KINDS
        started = time.perf_counter()
        method = getattr(op, "method", None)
        workers, operation = await asyncio.to_thread(self._begin, kind, instance_id, check, method)
        event_id = operation.event_id
        prepare = cmd.Prepare(event_id, op, ttl_s=self.settings.command_timeout)
        prepared = await self._ask(workers, prepare)
        problems = [(w, _outcome(r), r) for w, r in zip(workers, prepared, strict=True)]
        if any(why for _, why, _ in problems):
            for worker, _, reply in problems:
                # A silent worker may still prepare later: the Abort queued behind the
                # Prepare releases what it pinned. A Failed one holds nothing.
                if not isinstance(reply, cmd.Failed):
                    self.commands.notify(worker.address, [encode(cmd.Abort(event_id))])
            await asyncio.to_thread(self._refuse, operation, problems, started)

        committed = await self._ask(workers, cmd.Commit(event_id))
        failed = await asyncio.to_thread(
            self._record, operation, workers, prepared, committed, background
        )
        elapsed = time.perf_counter() - started
        self.latency.observe(kind, elapsed)
        logger.info(
            "%s on %s (%d workers): %d tokens, event %s %s, %.1f ms",
            kind,
            instance_id,
            len(workers),
            operation.num_tokens,
            event_id,
            operation.status,
            elapsed * 1000,
        )
        if failed:
            raise WorkerUnavailableError(
                f"{kind} failed on instance '{instance_id}': {operation.error}", event_id
            )
        return operation

    def _begin(
        self, kind: str, instance_id: str, check: Callable[[Instance], None], method: str | None
    ) -> tuple[list[WorkerRef], Operation]:
        state = self.state
        with state.lock:
            instance = state.instance(instance_id)
            check(instance)
            workers = [WorkerRef(instance_id, w.rank, w.address) for w in instance.ready_workers()]
            operation = state.operations.create(kind, instance_id, [w.rank for w in workers])
            operation.method = method
        return workers, operation

    def _record(
        self,
        operation: Operation,
        workers: list[WorkerRef],
        prepared: list[Answer],
        committed: list[Answer],
        background: bool,
    ) -> bool:
        """Record each worker's commit outcome; True if the operation failed."""
        operations = self.state.operations
        applied: list[int] = []
        refused: list[str] = []
        with self.state.lock:
            for worker, before, after in zip(workers, prepared, committed, strict=True):
                part = operation.part(worker.rank)
                assert part is not None and isinstance(before, cmd.Ok)
                why = _outcome(after)
                if why is not None:
                    refused.append(f"worker {worker.rank}: {why}")
                    operations.finish_part(operation, worker.rank, why)
                    continue
                assert isinstance(after, cmd.Ok)
                applied.append(worker.rank)
                part.num_tokens = (before if background else after).outcome.num_tokens
                if not background:
                    operations.finish_part(operation, worker.rank, outcome=after.outcome)
            operation.num_tokens = min(p.num_tokens for p in operation.workers)
            operations.start(operation)
            if refused:
                # A worker that answered Failed did not apply it; one that did not answer may
                # still apply the queued commit later.
                said_no = [
                    w.rank
                    for w, r in zip(workers, committed, strict=True)
                    if isinstance(r, cmd.Failed)
                ]
                unknown = [
                    w.rank for w in workers if w.rank not in applied and w.rank not in said_no
                ]
                error = (
                    f"commit failed ({'; '.join(refused)}): applied on worker(s) "
                    f"{_ranks(applied)}, not on worker(s) {_ranks(said_no)}, unknown on "
                    f"worker(s) {_ranks(unknown)}; it is not rolled back"
                )
                operations.fail(operation, error)  # running parts may still report
                operation.error = error  # also when the last part's failure already ended it
            return operation.status == "failed"

    def _refuse(
        self,
        operation: Operation,
        problems: list[tuple[WorkerRef, str | None, Answer]],
        started: float,
    ) -> NoReturn:
        """Fail the operation after the prepare phase (nothing was changed) and raise why."""
        by_reason: dict[str, list[int]] = {}
        for worker, why, _ in problems:
            if why:
                by_reason.setdefault(why, []).append(worker.rank)
        errors = "; ".join(
            f"worker{'s' if len(ranks) > 1 else ''} {_ranks(ranks)}: {why}"
            for why, ranks in by_reason.items()
        )
        unavailable = any(
            not isinstance(r, cmd.Ok | cmd.Failed)
            or (isinstance(r, cmd.Failed) and r.code in UNAVAILABLE_CODES)
            for _, why, r in problems
            if why
        )
        with self.state.lock:
            for worker, why, _ in problems:
                if why:
                    self.state.operations.finish_part(operation, worker.rank, why)
            self.state.operations.fail(operation, errors)
        self.latency.observe(operation.kind, time.perf_counter() - started)
        logger.warning(
            "%s on %s refused, event %s: %s",
            operation.kind,
            operation.instance_id,
            operation.event_id,
            errors,
        )
        if unavailable:
            raise WorkerUnavailableError(
                f"workers failed or did not answer within {self.settings.command_timeout:g} s, "
                f"nothing was changed: {errors}",
                operation.event_id,
            )
        if any(isinstance(r, cmd.Failed) and r.code == "conflict" for _, _, r in problems):
            raise NotYetError(f"{errors}; nothing was changed", operation.event_id)
        raise WorkerRejectedError(f"{errors}; nothing was changed", operation.event_id)
