"""The controller's state: instances, workers, the chunk index and operations. No I/O.

Callers: the monitor thread (`handle`, `expire`), and HTTP handlers in worker
threads (lookups, operations). One lock serialises them; every public method
takes it and none blocks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from lmc_connector import tokens as tok
from lmc_connector.control.controller.errors import UnknownInstanceError
from lmc_connector.control.controller.index import DEFAULT_CAPACITY, ChunkIndex, IndexFullError
from lmc_connector.control.controller.instances import Instance, Worker
from lmc_connector.control.controller.operations import OperationStore
from lmc_connector.control.wire import commands as cmd
from lmc_connector.control.wire import monitor as mon
from lmc_connector.throttle import Throttle

logger = logging.getLogger(__name__)

#: Seconds before asking an unknown worker to resync again (its Register may be in flight).
RESYNC_RETRY_S = 1.0
#: Unknown workers remembered as already asked to resync; beyond it, asks are not remembered.
MAX_RESYNC_ASKED = 10_000
#: Instances tracked at once: a registration of one more is refused with why.
MAX_INSTANCES = 4096
#: Seconds between two warnings of one kind (refused registrations, a full chunk index).
WARNING_EVERY_S = 10.0


@dataclass(frozen=True, slots=True)
class WorkerRef:
    """Where to reach one worker (what the command client needs)."""

    instance_id: str
    rank: int
    address: str


#: A notification for one worker's command port: what the state answers a worker message with.
Notice = tuple[WorkerRef, cmd.Command]


@dataclass(slots=True)
class IngestStats:
    messages: int = 0
    keys: int = 0
    ignored: int = 0
    refused: int = 0
    malformed: int = 0
    #: Chunk admits left out because the chunk index was full (`max_indexed_chunks`).
    unindexed: int = 0
    #: Messages whose handling failed unexpectedly (a bug; logged with its traceback).
    failed: int = 0
    lookups: int = 0


class ControllerState:
    """Owns every instance and worker, the chunk index and the tracked operations.

    Registration rules: a live worker (heard from within `worker_timeout`) is
    never replaced by a registration of another session, and an instance's
    `world_size` and `chunk_size` are those of its first worker while any
    worker is registered. A registration is answered (`Registered`, or
    `RegistrationRefused` with the reason) on the worker's command port; a
    worker re-sends it until answered, so one of the same session is taken
    again without dropping anything. Messages of a session the controller
    does not know are ignored.
    """

    def __init__(
        self, worker_timeout: float = 10.0, max_indexed_chunks: int = DEFAULT_CAPACITY
    ) -> None:
        self.worker_timeout = worker_timeout
        self.lock = threading.Lock()
        self.instances: dict[str, Instance] = {}
        self.index = ChunkIndex(max_indexed_chunks)
        self.operations = OperationStore()
        self.stats = IngestStats()
        self._resync_asked: dict[tuple[str, int, str], float] = {}
        #: Workers dropped since `take_departed` last ran (their command sockets can go).
        self._departed: list[WorkerRef] = []
        self._refusals = Throttle(WARNING_EVERY_S)
        self._index_full = Throttle(WARNING_EVERY_S)

    # -- worker messages (monitor thread) ---------------------------------------------------

    def handle(self, msg: mon.WorkerMessage, now: float | None = None) -> Notice | None:
        """Apply one worker message; returns what to tell the worker, if anything."""
        now = time.monotonic() if now is None else now
        with self.lock:
            self.stats.messages += 1
            if isinstance(msg, mon.ChunkEvents):
                self._chunk_events(msg, now)
            elif isinstance(msg, mon.Heartbeat):
                return self._heartbeat(msg, now)
            elif isinstance(msg, mon.Register):
                return self._register(msg, now)
            elif isinstance(msg, mon.Snapshot):
                self._snapshot(msg, now)
            elif isinstance(msg, mon.JobDone):
                self._job_done(msg)
            else:
                self._deregister(msg)
        return None

    def _worker(self, instance_id: str, rank: int, session: str) -> Worker | None:
        instance = self.instances.get(instance_id)
        worker = None if instance is None else instance.workers.get(rank)
        return worker if worker is not None and worker.spec.session == session else None

    def _refuse(self, msg: mon.Register, why: str) -> Notice:
        self.stats.refused += 1
        if self._refusals.ready():
            logger.warning(
                "refused registration of %s/%d from %s:%d: %s (%d refused so far)",
                msg.instance_id[:80],
                msg.rank,
                msg.host,
                msg.port,
                why,
                self.stats.refused,
            )
        ref = WorkerRef(msg.instance_id, msg.rank, f"tcp://{msg.host}:{msg.port}")
        return ref, cmd.RegistrationRefused(msg.session, why[:1000])

    def _register(self, msg: mon.Register, now: float) -> Notice:
        instance = self.instances.get(msg.instance_id)
        if instance is not None and instance.workers:
            old = instance.workers.get(msg.rank)
            if old is not None and old.spec.session == msg.session:
                return self._registered_again(old, msg, now)
            if old is not None and now - old.last_seen <= self.worker_timeout:
                return self._refuse(
                    msg,
                    f"rank {msg.rank} of instance '{msg.instance_id[:80]}' is held by a live "
                    f"worker (pid {old.spec.pid} at {old.spec.host}:{old.spec.port}, heard "
                    f"{now - old.last_seen:.1f} s ago); two vLLM instances may share this "
                    "lmcache_instance_id (give each its own), or the old worker has not been "
                    f"silent for {self.worker_timeout:g} s yet (retrying)",
                )
            shape = (instance.world_size, instance.chunk_size)
            if shape != (msg.world_size, msg.chunk_size):
                return self._refuse(
                    msg,
                    f"the instance has world_size={shape[0]} chunk_size={shape[1]}, the worker "
                    f"{msg.world_size} and {msg.chunk_size}: give it another lmcache_instance_id",
                )
        if msg.rank >= msg.world_size:
            return self._refuse(msg, f"rank {msg.rank} is not below world_size {msg.world_size}")
        if instance is None and len(self.instances) >= MAX_INSTANCES:
            return self._refuse(
                msg,
                f"this controller tracks {MAX_INSTANCES} instances already; an instance whose "
                f"workers stop is dropped after --worker-timeout ({self.worker_timeout:g} s), or "
                "give another group of instances a controller of its own",
            )
        try:
            self.index.declare(msg.instance_id, msg.locations)
        except IndexFullError as e:
            if instance is None:
                self.index.drop_instance(msg.instance_id)  # declared for nothing: forget it
            return self._refuse(msg, str(e))
        if instance is None or not instance.workers:
            self.index.drop_instance(msg.instance_id)
            self.index.declare(msg.instance_id, msg.locations)
            instance = self.instances[msg.instance_id] = Instance(
                msg.instance_id, msg.model, msg.world_size, msg.chunk_size
            )
        old = instance.workers.get(msg.rank)
        if old is not None:
            # The instance stays: deleting it would orphan the worker registered below.
            self._drop(instance, msg.rank, "worker re-registered", keep_instance=True)
            self._departed.append(WorkerRef(msg.instance_id, msg.rank, old.address))
        instance.model = msg.model
        worker = instance.workers[msg.rank] = Worker(msg, now, time.time(), now)
        self._resync_asked.pop((msg.instance_id, msg.rank, msg.session), None)
        logger.info(
            "worker %s/%d registered from %s:%d (pid %d, chunk_size %d, locations %s)",
            msg.instance_id,
            msg.rank,
            msg.host,
            msg.port,
            msg.pid,
            msg.chunk_size,
            ",".join(msg.locations),
        )
        return WorkerRef(msg.instance_id, msg.rank, worker.address), cmd.Registered(msg.session)

    def _registered_again(self, worker: Worker, msg: mon.Register, now: float) -> Notice:
        """A registration re-sent by a registered worker (its answer was late or lost): the
        same agent, so the same spec; its snapshot follows and replaces its chunks."""
        worker.last_seen = now
        return WorkerRef(msg.instance_id, msg.rank, worker.address), cmd.Registered(msg.session)

    def _heartbeat(self, msg: mon.Heartbeat, now: float) -> Notice | None:
        worker = self._worker(msg.instance_id, msg.rank, msg.session)
        if worker is not None:
            worker.last_seen = now
            worker.usage = msg.usage
            return None
        key = (msg.instance_id, msg.rank, msg.session)
        asked = self._resync_asked.get(key)
        if asked is not None and now - asked < RESYNC_RETRY_S:
            return None
        if len(self._resync_asked) < MAX_RESYNC_ASKED:
            self._resync_asked[key] = now
        return WorkerRef(msg.instance_id, msg.rank, f"tcp://{msg.host}:{msg.port}"), cmd.Resync()

    def _chunk_events(self, msg: mon.ChunkEvents, now: float) -> None:
        worker = self._worker(msg.instance_id, msg.rank, msg.session)
        if worker is None:
            self.stats.ignored += 1
            return
        worker.last_seen = now
        for op in msg.ops:
            try:
                if op.admitted:
                    self._admit(msg.instance_id, msg.rank, op.location, op.keys)
                else:
                    self.index.evict(msg.instance_id, msg.rank, op.location, op.keys)
            except IndexFullError as e:
                logger.warning("worker %s/%d: %s", msg.instance_id, msg.rank, e)
                continue
            self.stats.keys += len(op.keys)

    def _snapshot(self, msg: mon.Snapshot, now: float) -> None:
        worker = self._worker(msg.instance_id, msg.rank, msg.session)
        if worker is None:
            self.stats.ignored += 1
            return
        worker.last_seen = now
        self.index.drop_worker(msg.instance_id, msg.rank)
        for location, keys in msg.locations.items():
            try:
                self._admit(msg.instance_id, msg.rank, location, keys)
            except IndexFullError as e:
                logger.warning("worker %s/%d: %s", msg.instance_id, msg.rank, e)
        total = sum(len(k) for k in msg.locations.values())
        logger.info("worker %s/%d resynced %d chunks", msg.instance_id, msg.rank, total)

    def _admit(
        self, instance_id: str, rank: int, location: str, keys: Sequence[tok.ChunkKey]
    ) -> None:
        left_out = self.index.admit(instance_id, rank, location, keys)
        if not left_out:
            return
        self.stats.unindexed += left_out
        if self._index_full.ready():
            logger.warning(
                "the chunk index is full (%d chunk hashes, --max-indexed-chunks): %d chunks of "
                "%s/%d in %s not indexed (%d so far); lookups and operations miss them until "
                "evictions make room; raise --max-indexed-chunks if this controller has the "
                "memory (about 100 bytes a hash)",
                self.index.capacity,
                left_out,
                instance_id[:80],
                rank,
                location,
                self.stats.unindexed,
            )

    def _job_done(self, msg: mon.JobDone) -> None:
        op = self.operations.find(msg.event_id)
        worker = self._worker(msg.instance_id, msg.rank, msg.session)
        if op is None or worker is None or op.instance_id != msg.instance_id:
            self.stats.ignored += 1
            return
        self.operations.finish_part(op, msg.rank, outcome=msg.outcome)
        fitted = msg.outcome.calibration_id
        if op.kind == "calibrate" and op.method and fitted and not msg.outcome.errors:
            worker.spec.calibrations[op.method] = fitted
        if op.status in ("finished", "failed"):
            logger.info(
                "%s %s on %s: %s, %d chunks in %.3f s, %d -> %d bytes",
                op.kind,
                op.event_id,
                op.instance_id,
                op.status,
                sum(p.chunks_done for p in op.workers),
                max(p.seconds for p in op.workers),
                sum(p.bytes_before for p in op.workers),
                sum(p.bytes_after for p in op.workers),
            )

    def _deregister(self, msg: mon.Deregister) -> None:
        instance = self.instances.get(msg.instance_id)
        worker = self._worker(msg.instance_id, msg.rank, msg.session)
        if instance is not None and worker is not None:
            self._drop(instance, msg.rank, "worker deregistered")
            self._departed.append(WorkerRef(msg.instance_id, msg.rank, worker.address))
            logger.info("worker %s/%d deregistered", msg.instance_id, msg.rank)

    # -- liveness (monitor thread) ------------------------------------------------------------

    def expire(self, now: float | None = None) -> list[WorkerRef]:
        """Drop workers silent for longer than `worker_timeout` and fail lost operations."""
        now = time.monotonic() if now is None else now
        gone: list[WorkerRef] = []
        with self.lock:
            self._resync_asked = {
                key: asked
                for key, asked in self._resync_asked.items()
                if now - asked < RESYNC_RETRY_S
            }
            for instance in list(self.instances.values()):
                for worker in list(instance.workers.values()):
                    silent = now - worker.last_seen
                    if silent > self.worker_timeout:
                        gone.append(WorkerRef(instance.instance_id, worker.rank, worker.address))
                        self._drop(
                            instance, worker.rank, f"worker lost: no heartbeat for {silent:.1f} s"
                        )
                        logger.warning(
                            "worker %s/%d silent for %.1f s: dropped with its chunks",
                            instance.instance_id,
                            worker.rank,
                            silent,
                        )
            self._departed.extend(gone)
            self.operations.expire(now)
        return gone

    def take_departed(self) -> list[WorkerRef]:
        """Workers dropped since the last call whose address no registered worker uses now."""
        if not self._departed:
            return []
        with self.lock:
            departed, self._departed = self._departed, []
            in_use = {w.address for i in self.instances.values() for w in i.workers.values()}
        return [ref for ref in departed if ref.address not in in_use]

    def _drop(
        self, instance: Instance, rank: int, reason: str, keep_instance: bool = False
    ) -> None:
        instance.workers.pop(rank, None)
        self.index.drop_worker(instance.instance_id, rank)
        for op in self.operations.active():
            if op.instance_id == instance.instance_id and op.part(rank) is not None:
                self.operations.finish_part(op, rank, reason)
                self.operations.fail(op, f"worker {rank}: {reason}")
        if not instance.workers and not keep_instance:
            del self.instances[instance.instance_id]
            self.index.drop_instance(instance.instance_id)

    # -- queries (HTTP handlers) ------------------------------------------------------------

    def instance(self, instance_id: str) -> Instance:
        """The instance (caller holds `lock` while reading it), or UnknownInstanceError."""
        instance = self.instances.get(instance_id)
        if instance is None:
            raise UnknownInstanceError(instance_id, list(self.instances))
        return instance

    def lookup(
        self, tokens: Sequence[int], scope: tok.KeyScope | None = None
    ) -> dict[str, tuple[str, int]]:
        """Where the longest cached prefix of `tokens` (keyed under `scope`: its salt and
        adapter) lives, per instance (hits only).

        Tracks no operation: lookups are frequent and would push tracked ones
        out of the ended-operations window. Counted in `stats.lookups`.
        """
        with self.lock:
            self.stats.lookups += 1
            sizes = {i.instance_id: (i.chunk_size, i.world_size) for i in self.instances.values()}
        sizes_used = {cs for cs, _ in sizes.values()}
        hashes = {cs: tok.chunk_hashes(tokens, cs, scope) for cs in sizes_used}
        layout: dict[str, tuple[str, int]] = {}
        with self.lock:
            for instance_id, (chunk_size, world_size) in sizes.items():
                best = self.index.prefix(instance_id, hashes[chunk_size], range(world_size))
                if best is not None:
                    location, chunks = best
                    layout[instance_id] = (
                        location,
                        tok.prefix_tokens(chunks, len(tokens), chunk_size),
                    )
        return layout
