"""The in-worker control agent: registers with the controller, reports chunks, runs commands.

The vLLM connector builds one per worker when `enable_controller` is set:

    agent = ControlAgent(config, engine, rank, world_size, model)
    agent.start()   # binds lmcache_worker_ports[rank]; raises if it cannot
    ...
    agent.close()

Threads: one I/O thread owns both sockets (PUSH to `controller_pull_url`,
ROUTER on the command port); an ops thread validates and applies commands;
a jobs thread runs compress/decompress. The engine calls `chunks_admitted` /
`chunks_evicted` under its lock: they only append to a buffer that the I/O
thread flushes every `EVENT_FLUSH_S` or `EVENT_BATCH_KEYS` keys. Nothing
here runs on, or waits for, vLLM's forward pass.

Controller restarts: a restarted controller does not know this worker, so its
first heartbeat makes the controller send `Resync`; the agent then
re-registers and sends a full snapshot. A snapshot is also sent after any
event batch had to be dropped (the controller was not reading).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import zmq

from lmc_connector.cache.engine import CacheEngine, TransformJob
from lmc_connector.config import CacheConfig, ConfigError
from lmc_connector.control import messages as m
from lmc_connector.control.executor import OpExecutor
from lmc_connector.control.transport import WakePipe, configure, parse_host_port, tcp_url

logger = logging.getLogger(__name__)

#: Longest delay between a chunk event and its batch leaving (index staleness bound).
EVENT_FLUSH_S = 0.05
#: Keys buffered before a flush is forced, so batches stay a few hundred KB at most.
EVENT_BATCH_KEYS = 8192
#: Seconds close() waits for the I/O thread to send its goodbye.
CLOSE_TIMEOUT_S = 2.0


def _methods() -> list[str]:
    from lmc_connector.ops.codecs import codec_names

    return codec_names()


def _advertised(host: str) -> str:
    ip = tcp_url(host, 1).removeprefix("tcp://").rsplit(":", 1)[0]
    return socket.gethostbyname(socket.gethostname()) if ip == "0.0.0.0" else ip


class ControlAgent:
    def __init__(
        self, config: CacheConfig, engine: CacheEngine, rank: int, world_size: int, model: str
    ) -> None:
        if config.controller_pull_url is None:
            raise ConfigError("enable_controller needs controller_pull_url (e.g. localhost:9001)")
        try:
            self._controller_host, self._controller_port = parse_host_port(
                config.controller_pull_url, "controller_pull_url"
            )
        except ValueError as e:
            raise ConfigError(str(e)) from e
        self.config = config
        self.engine = engine
        self.rank = rank
        self.world_size = world_size
        self.model = model
        self.instance_id = config.lmcache_instance_id
        self.session = uuid.uuid4().hex
        self.port = config.worker_port(rank)
        self.host = config.lmcache_worker_host
        try:
            self._advertised_host = _advertised(self.host)
        except (ValueError, OSError) as e:
            raise ConfigError(f"lmcache_worker_host={self.host!r}: {e}") from e
        self._methods = _methods()
        self._executor = OpExecutor(engine, self._methods, self._job_done)
        self._ops = ThreadPoolExecutor(1, thread_name_prefix="lmc-agent-ops")
        self._pending_lock = threading.Lock()
        self._pending: list[m.ChunkOp] = []
        self._pending_keys = 0
        self._pending_since = 0.0
        self._outbox: queue.SimpleQueue[tuple[list[bytes], bool]] = queue.SimpleQueue()
        self._wake = WakePipe()
        self._stop = threading.Event()
        self._closed = False
        self._resync = True
        self._context: zmq.Context[zmq.Socket[bytes]] | None = None
        self._router: zmq.Socket[bytes] | None = None
        self._push: zmq.Socket[bytes] | None = None
        self._thread = threading.Thread(target=self._run, name=f"lmc-agent-{rank}", daemon=True)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Bind the command port (raises ConfigError if taken), then register in background."""
        self._context = zmq.Context()
        router = self._context.socket(zmq.ROUTER)
        configure(router)
        try:
            router.bind(tcp_url(self.host, self.port))
        except zmq.ZMQError as e:
            router.close(linger=0)
            self._context.term()
            raise ConfigError(
                f"control agent of rank {self.rank} cannot bind {self.host}:{self.port} "
                f"({e}); choose free lmcache_worker_ports"
            ) from e
        push = self._context.socket(zmq.PUSH)
        configure(push)
        push.connect(tcp_url(self._controller_host, self._controller_port))
        self._router, self._push = router, push
        self.engine.subscribe(self)
        self._thread.start()
        logger.info(
            "control agent %s/%d: commands on %s:%d, reporting to %s:%d",
            self.instance_id,
            self.rank,
            self.host,
            self.port,
            self._controller_host,
            self._controller_port,
        )

    def close(self) -> None:
        """Say goodbye to the controller, stop the threads and close the sockets."""
        if self._closed:
            return
        self._closed = True
        self.engine.unsubscribe(self)
        self._stop.set()
        self._wake.wake()
        if self._thread.is_alive():
            self._thread.join(timeout=CLOSE_TIMEOUT_S)
        self._ops.shutdown(wait=False, cancel_futures=True)
        self._executor.close()
        if self._context is not None:
            if self._thread.is_alive():
                self._context.destroy(linger=0)  # the I/O thread is stuck: force its sockets shut
            else:
                self._context.term()
        self._wake.close()

    # -- engine events (called under the engine lock: append only) ---------------------------

    def chunks_admitted(self, location: str, keys: Sequence[int]) -> None:
        self._record(True, location, keys)

    def chunks_evicted(self, location: str, keys: Sequence[int]) -> None:
        self._record(False, location, keys)

    def _record(self, admitted: bool, location: str, keys: Sequence[int]) -> None:
        if self._closed:
            return
        with self._pending_lock:
            pending = self._pending
            if pending and pending[-1].admitted == admitted and pending[-1].location == location:
                pending[-1].keys.extend(keys)
            else:
                if not pending:
                    self._pending_since = time.monotonic()
                pending.append(m.ChunkOp(admitted, location, list(keys)))
            before = self._pending_keys
            self._pending_keys += len(keys)
        if before < EVENT_BATCH_KEYS <= self._pending_keys:
            self._wake.wake()

    # -- callbacks from the ops and jobs threads ----------------------------------------------

    def _reply(self, identity: bytes, reply: m.Reply) -> None:
        self._outbox.put(([identity, m.encode(reply)], False))
        self._wake.wake()

    def _job_done(self, event_id: str, job: TransformJob) -> None:
        done = m.JobDone(
            self.instance_id,
            self.rank,
            self.session,
            event_id,
            num_tokens=job.num_tokens,
            chunks_done=job.chunks_done,
            chunks_skipped=job.chunks_skipped,
            bytes_before=job.bytes_before,
            bytes_after=job.bytes_after,
            seconds=job.seconds,
            errors=list(job.errors),
        )
        self._outbox.put(([m.encode(done)], True))
        self._wake.wake()

    # -- the I/O thread -----------------------------------------------------------------------

    def _run(self) -> None:
        router, push = self._router, self._push
        assert router is not None and push is not None
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(self._wake.fileno(), zmq.POLLIN)
        decoder = m.command_decoder()
        interval = self.config.controller_heartbeat_interval
        next_beat = time.monotonic()
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                due = next_beat
                if self._pending:
                    due = min(due, self._pending_since + EVENT_FLUSH_S)
                for item, _ in poller.poll(max(0, int((due - now) * 1000) + 1)):
                    if item is router:
                        self._receive(router, decoder)
                self._wake.drain()
                self._send_outbox(router, push)
                if self._resync:
                    self._send_snapshot(push)
                now = time.monotonic()
                if self._pending and (
                    now >= self._pending_since + EVENT_FLUSH_S
                    or self._pending_keys >= EVENT_BATCH_KEYS
                ):
                    self._flush(push)
                if now >= next_beat:
                    next_beat = now + interval
                    self._heartbeat(push)
                    self._ops.submit(self._sweep)
            self._send(push, [m.encode(m.Deregister(self.instance_id, self.rank, self.session))])
        finally:
            router.close(linger=0)
            push.close()

    def _receive(self, router: zmq.Socket[bytes], decoder: m.Decoder[m.Command]) -> None:
        while True:
            try:
                frames = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                logger.warning("dropped a command of %d frames (expected 2)", len(frames))
                continue
            identity, payload = frames
            try:
                cmd = decoder.decode(payload)
            except m.MessageError as e:
                logger.warning("%s", e)
                continue
            if isinstance(cmd, m.Resync):
                self._resync = True
                self._reply(identity, m.Ok(cmd.request_id))
            elif isinstance(cmd, m.Prepare):
                work = partial(self._executor.prepare, cmd, time.monotonic())
                self._submit(identity, cmd.request_id, work)
            elif isinstance(cmd, m.Commit):
                self._submit(identity, cmd.request_id, partial(self._executor.commit, cmd))
            else:
                self._submit(identity, cmd.request_id, partial(self._executor.abort, cmd))

    def _submit(self, identity: bytes, request_id: int, work: Callable[[], m.Reply]) -> None:
        """Run `work` on the ops thread and send its reply; every command gets one."""

        def run() -> None:
            try:
                reply = work()
            except Exception as e:  # boundary: this command fails as "internal"; agent lives on
                logger.exception("command %d failed unexpectedly", request_id)
                reply = m.Failed(request_id, "internal", f"{type(e).__name__}: {e}")
            self._reply(identity, reply)

        self._ops.submit(run)

    def _sweep(self) -> None:
        try:
            self._executor.sweep()
        except Exception:  # boundary: stale prepared ops stay until the next sweep
            logger.exception("sweeping stale prepared commands failed")

    def _send(self, sock: zmq.Socket[bytes], frames: list[bytes]) -> bool:
        try:
            sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def _send_outbox(self, router: zmq.Socket[bytes], push: zmq.Socket[bytes]) -> None:
        while True:
            try:
                frames, to_controller = self._outbox.get_nowait()
            except queue.Empty:
                return
            if not self._send(push if to_controller else router, frames):
                logger.warning("dropped a message: the controller is not reading")

    def _send_snapshot(self, push: zmq.Socket[bytes]) -> None:
        register = m.Register(
            instance_id=self.instance_id,
            rank=self.rank,
            world_size=self.world_size,
            session=self.session,
            host=self._advertised_host,
            port=self.port,
            model=self.model,
            chunk_size=self.engine.layout.chunk_size,
            locations=self.engine.locations,
            methods=self._methods,
            pid=os.getpid(),
        )
        # Under the engine lock no event can slip between the snapshot and the buffer reset.
        with self.engine.lock:
            keys = self.engine.snapshot()
            with self._pending_lock:
                self._pending, self._pending_keys = [], 0
        snapshot = m.Snapshot(self.instance_id, self.rank, self.session, keys)
        self._resync = not (
            self._send(push, [m.encode(register)]) and self._send(push, [m.encode(snapshot)])
        )
        if not self._resync:
            logger.info(
                "control agent %s/%d registered with %d chunks",
                self.instance_id,
                self.rank,
                sum(len(k) for k in keys.values()),
            )

    def _flush(self, push: zmq.Socket[bytes]) -> None:
        with self._pending_lock:
            ops, self._pending, self._pending_keys = self._pending, [], 0
        batch = m.ChunkEvents(self.instance_id, self.rank, self.session, ops)
        if not self._send(push, [m.encode(batch)]):
            logger.warning("controller not reading: chunk events dropped, will resync")
            self._resync = True

    def _heartbeat(self, push: zmq.Socket[bytes]) -> None:
        usage = {loc: list(v) for loc, v in self.engine.usage().items()}
        beat = m.Heartbeat(
            self.instance_id, self.rank, self.session, self._advertised_host, self.port, usage
        )
        self._send(push, [m.encode(beat)])
