"""Peers that speak the real wire protocol without being real workers: an attacker's forged
messages and a simulated fleet of thousands of command ports, all on real sockets."""

from __future__ import annotations

import threading
from typing import Any

import msgspec
import zmq

from lmc_connector.control.controller.main import raise_open_files_limit
from lmc_connector.control.wire import commands as cmd
from lmc_connector.control.wire import monitor as mon
from lmc_connector.control.wire.codec import encode
from lmc_connector.control.wire.rpc.envelope import NOTIFY, REQUEST_ID
from lmc_connector.control.wire.security import ChannelSecurity
from lmc_connector.operations import JobOutcome

LOCAL = ChannelSecurity()
CPU = "LocalCPUBackend"


def register(
    instance_id: str,
    rank: int,
    session: str,
    port: int,
    world_size: int = 1,
    chunk_size: int = 4,
    host: str = "127.0.0.1",
) -> mon.Register:
    return mon.Register(
        instance_id, rank, world_size, session, host, port, "tiny", chunk_size, [CPU], ["fp8"]
    )


def heartbeat(instance_id: str, rank: int, session: str, port: int) -> mon.Heartbeat:
    return mon.Heartbeat(instance_id, rank, session, "127.0.0.1", port)


def job_done(instance_id: str, rank: int, session: str, event_id: str) -> mon.JobDone:
    outcome = JobOutcome(num_tokens=12, chunks_done=3, bytes_before=1, bytes_after=10**12)
    return mon.JobDone(instance_id, rank, session, event_id, outcome)


class MonitorPeer:
    """A PUSH socket to a controller's monitor port, as a worker (or an attacker) holds one."""

    def __init__(self, monitor_port: int, security: ChannelSecurity = LOCAL) -> None:
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._push = security.dial(self._context, zmq.PUSH, f"tcp://127.0.0.1:{monitor_port}")

    def send(self, *messages: msgspec.Struct | bytes) -> int:
        """Queue `messages`; returns how many were dropped because no controller takes them
        (a refused handshake leaves the socket nobody to send to)."""
        dropped = 0
        for message in messages:
            data = message if isinstance(message, bytes) else encode(message)
            try:
                self._push.send(data, zmq.NOBLOCK)
            except zmq.Again:
                dropped += 1
        return dropped

    def close(self) -> None:
        self._push.close(linger=2000)
        self._context.term()

    def __enter__(self) -> MonitorPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CommandPorts:
    """One ROUTER bound to `count` ports of 127.0.0.1: the command ports of simulated workers.

    Owns the socket and a thread that answers every Prepare / Commit / Abort
    with Ok and records the notifications it receives (registration
    answers, resync requests) and the requests (commands a hijacker would
    receive). Construct, use `ports`, `close`.
    """

    def __init__(self, count: int, security: ChannelSecurity = LOCAL) -> None:
        raise_open_files_limit()  # one listening descriptor per port
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._sock = security.listen(self._context, zmq.ROUTER, "tcp://127.0.0.1:0")
        self.ports = [self._port()]
        for _ in range(count - 1):
            self._sock.bind("tcp://127.0.0.1:0")
            self.ports.append(self._port())
        self._decoder = cmd.command_decoder()
        self._lock = threading.Lock()
        self.notices: list[cmd.Command] = []
        self.requests: list[cmd.Command] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _port(self) -> int:
        return int(self._sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])

    def acknowledged(self) -> set[str]:
        """Sessions the controller said it registered."""
        with self._lock:
            return {n.session for n in self.notices if isinstance(n, cmd.Registered)}

    def of_kind(self, kind: type[Any]) -> list[Any]:
        with self._lock:
            return [n for n in self.notices + self.requests if isinstance(n, kind)]

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(100):
                continue
            while True:
                try:
                    identity, request_id, payload = self._sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                command = self._decoder.decode(payload)
                with self._lock:
                    notify = REQUEST_ID.unpack(request_id)[0] == NOTIFY
                    (self.notices if notify else self.requests).append(command)
                if not notify:
                    self._sock.send_multipart([identity, request_id, encode(cmd.Ok())])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close(linger=0)
        self._context.term()
