"""The in-worker control agent: reports to the controller and executes its commands.

The vLLM connector builds one per worker when `enable_controller` is set:

    agent = ControlAgent(config, engine, rank, world_size, model)
    agent.start()   # binds lmcache_worker_ports[rank]; raises ConfigError if it cannot
    ...
    agent.close()

Threads: the command server thread (the request/reply transport) decodes
commands and hands them to the ops thread, which validates and applies them
one at a time; the jobs thread runs compress/decompress, calibrations and pulls; the reporter thread
talks to the monitor port. With `enable_p2p`, the peer server thread serves this worker's
chunks to other instances and the peer client thread fetches from them. Nothing here runs
on, or waits for, vLLM's forward pass.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import zmq

from lmc_connector.affinity import threads_on_every_cpu
from lmc_connector.cache import CacheEngine
from lmc_connector.config import CacheConfig, ConfigError
from lmc_connector.control.agent.executor import OpExecutor
from lmc_connector.control.agent.peer_client import PeerClient
from lmc_connector.control.agent.peer_server import PeerServer
from lmc_connector.control.agent.reporter import Reporter
from lmc_connector.control.wire import commands as cmd
from lmc_connector.control.wire.codec import MessageError, encode
from lmc_connector.control.wire.monitor import WorkerSpec
from lmc_connector.control.wire.rpc import Call, RpcServer
from lmc_connector.control.wire.security import ChannelSecurity, worker_security
from lmc_connector.control.wire.sockets import MAX_MESSAGE_BYTES, parse_host_port, tcp_url
from lmc_connector.throttle import Throttle

logger = logging.getLogger(__name__)

#: Commands waiting for the ops thread; beyond it a command is refused as busy.
MAX_QUEUED_COMMANDS = 256
#: Of those, commands from one connection: a peer flooding the port cannot crowd out the
#: controller's connection (with a secret, every peer holds it; without, loopback only).
MAX_QUEUED_PER_PEER = 64
#: Seconds between two warnings about malformed commands.
BAD_COMMAND_LOG_EVERY_S = 10.0


def _methods() -> tuple[list[str], list[str]]:
    """Every codec, and those that need a calibration."""
    from lmc_connector.cache.calibrations import calibrated_methods
    from lmc_connector.ops.codecs import codec_names

    return codec_names(), calibrated_methods()


def _advertised(host: str) -> str:
    ip = tcp_url(host, 1).removeprefix("tcp://").rsplit(":", 1)[0]
    return socket.gethostbyname(socket.gethostname()) if ip == "0.0.0.0" else ip


class ControlAgent:
    """Owns this worker's link to the controller: the command server, the ops thread, the
    executor of prepared commands and the reporter.

    Built and started by the connector's worker half on vLLM's worker thread;
    afterwards it runs on its own threads (see the module docstring).
    `security` (from the config when not given) secures its channels; the
    worker half passes the same object to its other channels.
    """

    def __init__(
        self,
        config: CacheConfig,
        engine: CacheEngine,
        rank: int,
        world_size: int,
        model: str,
        security: ChannelSecurity | None = None,
    ) -> None:
        if config.controller_pull_url is None:
            raise ConfigError("enable_controller needs controller_pull_url (e.g. localhost:9001)")
        try:
            host, port = parse_host_port(config.controller_pull_url, "controller_pull_url")
            self._controller_url = tcp_url(host, port)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        self.config = config
        self.engine = engine
        self.security = worker_security(config) if security is None else security
        self.host = config.lmcache_worker_host
        try:
            advertised = _advertised(self.host)
        except (ValueError, OSError) as e:
            raise ConfigError(f"lmcache_worker_host={self.host!r}: {e}") from e
        peer_host = peer_port = None
        if config.enable_p2p:
            try:
                peer_host, peer_port = _advertised(config.peer_host), config.peer_port(rank)
            except (ValueError, OSError) as e:
                raise ConfigError(f"p2p_host={config.peer_host!r}: {e}") from e
        methods, calibrated = _methods()
        self.spec = WorkerSpec(
            instance_id=config.lmcache_instance_id,
            rank=rank,
            world_size=world_size,
            session=uuid.uuid4().hex,
            host=advertised,
            port=config.worker_port(rank),
            model=model,
            chunk_size=engine.layout.chunk_size,
            locations=engine.locations,
            methods=methods,
            pid=os.getpid(),
            peer_host=peer_host,
            peer_port=peer_port,
            layout=engine.layout.instance_fingerprint(),
            calibrated_methods=calibrated,
            calibrations=engine.calibrations.current_ids(),
        )
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        #: This worker's chunks for other instances, and its fetches from them (enable_p2p).
        self.peer_server: PeerServer | None = None
        self.peers: PeerClient | None = None
        if peer_port is not None:
            largest = engine.layout.nbytes(engine.layout.chunk_size)
            if largest > MAX_MESSAGE_BYTES:
                raise ConfigError(
                    f"enable_p2p: a chunk of this model is {largest / 2**20:.0f} MiB, more than "
                    f"the peer channel's {MAX_MESSAGE_BYTES >> 20} MiB per message; lower "
                    "chunk_size, or turn enable_p2p off"
                )
            bind = tcp_url(config.peer_host, peer_port)
            self.peer_server = PeerServer(
                self._context, engine, bind, self.security, f"peer-server-{rank}"
            )
            self.peers = PeerClient(
                self._context, engine, config.p2p_timeout_ms / 1000, self.security
            )
        self._ops = ThreadPoolExecutor(1, thread_name_prefix="lmc-agent-ops")
        self._queued = threading.BoundedSemaphore(MAX_QUEUED_COMMANDS)
        #: Commands queued per connection (ROUTER identity); touched by the server and ops threads.
        self._queued_by_peer: Counter[bytes] = Counter()
        self._peers_lock = threading.Lock()
        self._reporter = Reporter(
            self.spec,
            engine,
            config.controller_heartbeat_interval,
            on_beat=self._sweep_soon,
        )
        self._executor = OpExecutor(
            engine, self.spec.methods, self._reporter.job_done, self.peers, rank
        )
        self._server = RpcServer(
            self._context,
            tcp_url(self.host, self.spec.port),
            self._handle,
            f"agent-{rank}",
            self.security,
        )
        self._decoder = cmd.command_decoder()
        self._bad_commands = Throttle(BAD_COMMAND_LOG_EVERY_S)
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Bind the command port (raises ConfigError if taken), then register in background.

        The agent's threads (and its ZeroMQ I/O thread) run on every CPU the process may
        use, even when started from a thread bound to one core (see `affinity`); the ops and
        jobs threads, started later by the command server's thread, inherit that."""
        with threads_on_every_cpu():
            self._start()

    def _start(self) -> None:
        try:
            self._server.start()
        except zmq.ZMQError as e:
            self._context.term()
            raise ConfigError(
                f"control agent of rank {self.spec.rank} cannot bind {self.host}:"
                f"{self.spec.port} ({e}); choose free lmcache_worker_ports"
            ) from e
        except ValueError as e:  # InsecureBindError: lmcache_worker_host beyond loopback
            self._context.term()
            raise ConfigError(f"lmcache_worker_host={self.host!r}: {e}") from e
        if self.peer_server is not None and self.peers is not None:
            try:
                self.peer_server.start()
            except zmq.ZMQError as e:
                self._server.close()
                self._context.destroy(linger=0)
                raise ConfigError(
                    f"peer server of rank {self.spec.rank} cannot bind {self.config.peer_host}:"
                    f"{self.spec.peer_port} ({e}); choose free p2p_init_ports"
                ) from e
            except ValueError as e:  # InsecureBindError: p2p_host beyond loopback
                self._server.close()
                self._context.destroy(linger=0)
                raise ConfigError(f"p2p_host={self.config.peer_host!r}: {e}") from e
            self.peers.start()
        self._reporter.start(self._context, self._controller_url, self.security)
        logger.info(
            "control agent %s/%d: commands on %s:%d, reporting to %s, %s (%s)",
            self.spec.instance_id,
            self.spec.rank,
            self.host,
            self.spec.port,
            self._controller_url,
            f"serving peers on {self.spec.peer_address}" if self.peer_server else "no peers",
            self.security.describe(),
        )

    def close(self) -> None:
        """Say goodbye to the controller, stop the threads and close the sockets."""
        if self._closed:
            return
        self._closed = True
        self._reporter.close()
        self._server.close()
        self._ops.shutdown(wait=False, cancel_futures=True)
        self._executor.close()
        stuck = self._reporter.alive or self._server.alive
        if self.peer_server is not None and self.peers is not None:
            self.peer_server.close()
            self.peers.close()
            stuck = stuck or self.peer_server.alive or self.peers.alive
        if stuck:
            self._context.destroy(linger=0)  # a thread is stuck: force its sockets shut
        else:
            self._context.term()

    # -- commands (command server thread) ----------------------------------------------------

    def _handle(self, call: Call) -> None:
        try:
            command = self._decoder.decode(call.frames[0].buffer)
        except MessageError as e:
            if self._bad_commands.ready():
                logger.warning("%s (dropped; more are not logged for a while)", e)
            call.reply([encode(cmd.Failed("bad_request", str(e)[:200]))])
            return
        if isinstance(command, cmd.Resync):
            self._reporter.request_resync()
            call.reply([encode(cmd.Ok())])
        elif isinstance(command, cmd.Registered):
            self._reporter.registered(command.session)
        elif isinstance(command, cmd.RegistrationRefused):
            self._reporter.refused(command.session, command.reason)
        elif isinstance(command, cmd.Prepare):
            received = time.monotonic()
            self._run(call, partial(self._executor.prepare, command, received, call.identity))
        elif isinstance(command, cmd.Commit):
            self._run(call, partial(self._executor.commit, command))
        else:
            self._run(call, partial(self._executor.abort, command))

    def _run(self, call: Call, work: Callable[[], cmd.Reply]) -> None:
        """Run `work` on the ops thread and send its reply; every command gets one."""

        def run() -> None:
            try:
                reply = work()
            except Exception as e:  # boundary: this command fails as "internal"; agent lives on
                logger.exception("a command failed unexpectedly")
                reply = cmd.Failed("internal", f"{type(e).__name__}: {e}")
            call.reply([encode(reply)])

        peer = call.identity
        with self._peers_lock:
            taken = self._queued_by_peer[peer] < MAX_QUEUED_PER_PEER
            if taken:
                self._queued_by_peer[peer] += 1

        def run_and_count() -> None:
            try:
                run()
            finally:
                self._peer_done(peer)

        if not (taken and self._submit(run_and_count)):
            if taken:
                self._peer_done(peer)
            call.reply([encode(cmd.Failed("busy", "too many commands queued; retry later"))])

    def _peer_done(self, peer: bytes) -> None:
        with self._peers_lock:
            self._queued_by_peer[peer] -= 1
            if self._queued_by_peer[peer] <= 0:
                del self._queued_by_peer[peer]

    def _sweep_soon(self) -> None:
        self._submit(self._executor.sweep)

    def _submit(self, work: Callable[[], None]) -> bool:
        """Queue `work` for the ops thread; False when the queue is full."""
        if not self._queued.acquire(blocking=False):
            return False

        def run() -> None:
            try:
                work()
            except Exception:  # boundary: e.g. a failing sweep; the ops thread lives on
                logger.exception("agent ops task failed")
            finally:
                self._queued.release()

        try:
            self._ops.submit(run)
        except RuntimeError:  # shut down
            self._queued.release()
            return False
        return True
