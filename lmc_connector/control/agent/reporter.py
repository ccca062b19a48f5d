"""What a worker tells the controller: registration, heartbeats, chunk events, job outcomes.

The engine calls `chunks_admitted` / `chunks_evicted` under its lock: they
only append to a buffer that the reporter thread flushes every
`EVENT_FLUSH_S` or `EVENT_BATCH_KEYS` keys. A snapshot (with a fresh
registration) is sent at start, when the controller asks for a resync (it
restarted and does not know this worker), and after a batch of events had to
be dropped because the controller was not reading. A registration is sent
again until the controller answers it (`registration.Registration`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

import zmq

from lmc_connector.cache import CacheEngine
from lmc_connector.control.agent.link import ControllerLink
from lmc_connector.control.agent.registration import UNANSWERED_WARN_S, Registration
from lmc_connector.control.wire import monitor as mon
from lmc_connector.control.wire.codec import encode
from lmc_connector.control.wire.security import ChannelSecurity
from lmc_connector.control.wire.sockets import WakePipe
from lmc_connector.operations import JobOutcome
from lmc_connector.throttle import Throttle
from lmc_connector.tokens import ChunkKey

logger = logging.getLogger(__name__)

#: Longest delay between a chunk event and its batch leaving (index staleness bound).
EVENT_FLUSH_S = 0.05
#: Keys buffered before a flush is forced, so batches stay a few hundred KB at most.
EVENT_BATCH_KEYS = 8192
#: Keys buffered at most; beyond it the buffer is dropped and a full resync follows.
MAX_BUFFERED_KEYS = 1_000_000
#: Job outcomes waiting to be sent; the controller fails their operations if they are lost.
MAX_OUTBOX = 1024
#: Seconds close() waits for the reporter thread to send its goodbye.
CLOSE_TIMEOUT_S = 2.0


class Reporter:
    """Owns the PUSH socket to the controller's monitor port and the thread that uses it,
    the buffer of chunk events not yet sent and the job outcomes waiting to leave.

    `spec` describes this worker (sent in every registration); `on_beat` is
    called on the reporter thread at every heartbeat and must not block.
    Construct, `start(context, url, security)`, `close()`.
    """

    def __init__(
        self,
        spec: mon.WorkerSpec,
        engine: CacheEngine,
        heartbeat_s: float,
        on_beat: Callable[[], None],
    ) -> None:
        self.spec = spec
        self._engine = engine
        self._heartbeat_s = heartbeat_s
        self._on_beat = on_beat
        self._lock = threading.Lock()
        self._pending: list[mon.ChunkOp] = []
        self._pending_keys = 0
        self._pending_since = 0.0
        self._outbox: queue.Queue[bytes] = queue.Queue(MAX_OUTBOX)
        self._wake = WakePipe()
        self._stop = threading.Event()
        self._resync = True
        self._closed = False
        self._push: zmq.Socket[bytes] | None = None
        self._link: ControllerLink | None = None
        self._registration = Registration(
            f"control agent {spec.instance_id}/{spec.rank}", spec.session, "", ""
        )
        self._dropped_outcomes = 0
        self._dropped_log = Throttle(UNANSWERED_WARN_S)
        self._thread = threading.Thread(
            target=self._run, name=f"lmc-reporter-{spec.rank}", daemon=True
        )

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def acknowledged(self) -> bool:
        """Whether the controller answered this worker's last registration (any thread)."""
        return self._registration.acknowledged and not self._resync

    def start(
        self, context: zmq.Context[zmq.Socket[bytes]], url: str, security: ChannelSecurity
    ) -> None:
        spec = self.spec
        who = f"control agent {spec.instance_id}/{spec.rank}"
        command = f"{spec.host}:{spec.port}"
        self._registration = Registration(who, spec.session, url, command)
        push = security.client_socket(context, zmq.PUSH)
        self._link = ControllerLink(push, url, who)  # before connect: it sees the first one
        push.connect(url)
        self._push = push
        self._engine.subscribe(self)
        self._thread.start()

    def close(self) -> None:
        """Send a goodbye, stop the thread and close the socket (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._engine.unsubscribe(self)
        self._stop.set()
        self._wake.wake()
        if self._thread.is_alive():
            self._thread.join(timeout=CLOSE_TIMEOUT_S)
        self._wake.close()

    def request_resync(self) -> None:
        """Register again and send a full snapshot (any thread)."""
        self._resync = True
        self._wake.wake()

    def registered(self, session: str) -> None:
        """The controller took the registration of `session` (any thread)."""
        self._registration.answer(session, True)
        self._wake.wake()

    def refused(self, session: str, reason: str) -> None:
        """The controller refused the registration of `session` (any thread)."""
        self._registration.answer(session, False, reason)
        self._wake.wake()

    def job_done(self, event_id: str, outcome: JobOutcome) -> None:
        """Report a finished job (any thread)."""
        spec = self.spec
        done = mon.JobDone(spec.instance_id, spec.rank, spec.session, event_id, outcome)
        try:
            self._outbox.put_nowait(encode(done))
        except queue.Full:
            self._outcome_dropped(event_id)
            return
        self._wake.wake()

    def _outcome_dropped(self, event_id: str) -> None:
        """Count (and now and then log) a job outcome that could not be sent; the controller
        fails its operation as lost."""
        self._dropped_outcomes += 1
        if self._dropped_log.ready():
            logger.warning(
                "job outcome of event %s dropped: the controller is not reading (%d so far)",
                event_id,
                self._dropped_outcomes,
            )

    # -- chunk events (called under the engine lock: append only) ----------------------------

    def chunks_admitted(self, location: str, keys: Sequence[ChunkKey]) -> None:
        self._record(True, location, keys)

    def chunks_evicted(self, location: str, keys: Sequence[ChunkKey]) -> None:
        self._record(False, location, keys)

    def _record(self, admitted: bool, location: str, keys: Sequence[ChunkKey]) -> None:
        if self._closed:
            return
        with self._lock:
            pending = self._pending
            if pending and pending[-1].admitted == admitted and pending[-1].location == location:
                pending[-1].keys.extend(keys)
            else:
                if not pending:
                    self._pending_since = time.monotonic()
                pending.append(mon.ChunkOp(admitted, location, list(keys)))
            before = self._pending_keys
            self._pending_keys += len(keys)
            if self._pending_keys > MAX_BUFFERED_KEYS:
                self._pending, self._pending_keys, self._resync = [], 0, True
        if before < EVENT_BATCH_KEYS <= self._pending_keys:
            self._wake.wake()

    # -- the reporter thread -------------------------------------------------------------------

    def _run(self) -> None:
        push, link = self._push, self._link
        assert push is not None and link is not None
        poller = zmq.Poller()
        poller.register(self._wake.fileno(), zmq.POLLIN)
        poller.register(link.socket, zmq.POLLIN)
        next_beat = time.monotonic()
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                due = next_beat
                if self._pending:
                    due = min(due, self._pending_since + EVENT_FLUSH_S)
                due = min(due, self._registration.due() or due)
                poller.poll(max(0, int((due - now) * 1000) + 1))
                self._wake.drain()
                if link.drain():
                    self._registration.reconnected()
                self._send_outbox(push)
                if self._registration.follow(time.monotonic(), link.connected):
                    self._resync = True
                if self._resync:
                    self._send_snapshot(push)
                now = time.monotonic()
                if self._pending and (
                    now >= self._pending_since + EVENT_FLUSH_S
                    or self._pending_keys >= EVENT_BATCH_KEYS
                ):
                    self._flush(push)
                if now >= next_beat:
                    next_beat = now + self._heartbeat_s
                    self._heartbeat(push)
                    self._on_beat()
                    link.check(now)
            spec = self.spec
            self._send(push, encode(mon.Deregister(spec.instance_id, spec.rank, spec.session)))
        finally:
            link.close()
            push.close()

    def _send(self, push: zmq.Socket[bytes], data: bytes) -> bool:
        try:
            push.send(data, zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def _send_outbox(self, push: zmq.Socket[bytes]) -> None:
        while True:
            try:
                data = self._outbox.get_nowait()
            except queue.Empty:
                return
            if not self._send(push, data):
                self._outcome_dropped("?")

    def _send_snapshot(self, push: zmq.Socket[bytes]) -> None:
        spec = self.spec
        register = mon.Register(
            **{name: getattr(spec, name) for name in mon.WorkerSpec.__struct_fields__}
        )
        register.calibrations = self._engine.calibrations.current_ids()  # fitted since start
        # Under the engine lock no event can slip between the snapshot and the buffer reset.
        with self._engine.lock:
            keys = self._engine.snapshot()
            with self._lock:
                self._pending, self._pending_keys = [], 0
        snapshot = mon.Snapshot(spec.instance_id, spec.rank, spec.session, dict(keys))
        self._resync = not (
            self._send(push, encode(register)) and self._send(push, encode(snapshot))
        )
        if not self._resync:
            self._registration.sent(sum(len(k) for k in keys.values()))

    def _flush(self, push: zmq.Socket[bytes]) -> None:
        spec = self.spec
        with self._lock:
            ops, self._pending, self._pending_keys = self._pending, [], 0
        batch = mon.ChunkEvents(spec.instance_id, spec.rank, spec.session, ops)
        if not self._send(push, encode(batch)):
            logger.warning("controller not reading: chunk events dropped, will resync")
            self._resync = True

    def _heartbeat(self, push: zmq.Socket[bytes]) -> None:
        spec = self.spec
        usage = {
            name: mon.TierReport(u.chunks, u.used_bytes, u.capacity_bytes)
            for name, u in self._engine.usage().items()
        }
        beat = mon.Heartbeat(spec.instance_id, spec.rank, spec.session, spec.host, spec.port, usage)
        self._send(push, encode(beat))
