"""The hostile-peer cases of issue 12, replayed against a running controller and its agents
(used by `control_load.py`). Each attack runs in its own thread until `stop` is set and
reports what it saw; none of them holds the control secret."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import msgspec
import zmq
from _control_agents import prompt

from lmc_connector.control.wire import commands as cmd
from lmc_connector.control.wire import monitor as mon
from lmc_connector.control.wire.codec import encode
from lmc_connector.control.wire.rpc import RpcClient, RpcError
from lmc_connector.control.wire.security import ChannelSecurity
from lmc_connector.operations import JobOutcome

CPU = "LocalCPUBackend"
PLAIN = ChannelSecurity()
TEN_MILLION_TOKENS = b'{"tokens": [' + b"1," * 9_999_999 + b"1]}"
MILLION_WORKER_IDS = b'{"instance_id": "load-0", "worker_ids": [' + b"0," * 999_999 + b"0]}"


@dataclass
class Attack:
    name: str
    sent: int = 0
    answers: dict[str, int] = field(default_factory=dict)

    def saw(self, what: str) -> None:
        self.answers[what] = self.answers.get(what, 0) + 1


class Attacker:
    """Owns the attacker's sockets and threads; `start` them all, `stop` after the load."""

    def __init__(self, url: str, monitor_port: int, agent_ports: dict[str, int]) -> None:
        self.url = url
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._push = PLAIN.dial(self._context, zmq.PUSH, f"tcp://127.0.0.1:{monitor_port}")
        self._push_lock = threading.Lock()
        self._agent_ports = agent_ports
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.attacks: list[Attack] = []
        self._decoys = PLAIN.listen(self._context, zmq.ROUTER, "tcp://127.0.0.1:0")
        self._decoy_ports = [self._port()]
        for _ in range(1099):  # 1,100 distinct addresses that accept connections
            self._decoys.bind("tcp://127.0.0.1:0")
            self._decoy_ports.append(self._port())

    def _port(self) -> int:
        return int(self._decoys.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])

    def _send(self, *messages: msgspec.Struct | bytes) -> None:
        with self._push_lock:
            for message in messages:
                data = message if isinstance(message, bytes) else encode(message)
                with contextlib.suppress(zmq.Again):  # the controller is not reading: dropped
                    self._push.send(data, zmq.NOBLOCK)

    def _every(self, name: str, period: float, action: Callable[[Attack], None]) -> None:
        attack = Attack(name)
        self.attacks.append(attack)

        def loop() -> None:
            while not self._stop.is_set():
                action(attack)
                self._stop.wait(period)

        thread = threading.Thread(target=loop, daemon=True)
        self._threads.append(thread)

    def start(self, blocked_events: list[str]) -> None:
        decoy = self._decoy_ports[0]

        def reshape(a: Attack) -> None:
            a.sent += 1
            self._send(_register("load-0", 1, "forged", decoy, world_size=2))

        def hijack(a: Attack) -> None:
            a.sent += 1
            self._send(_register("load-1", 0, "forged", decoy))

        def job_done(a: Attack) -> None:
            outcome = JobOutcome(num_tokens=1, chunks_done=1, bytes_after=10**12)
            for event_id in blocked_events:
                a.sent += 1
                self._send(mon.JobDone("blocked", 0, "forged", event_id, outcome))

        def heartbeats(a: Attack) -> None:
            a.sent += len(self._decoy_ports)
            self._send(
                *[
                    mon.Heartbeat("ghost", 0, f"g{i}", "127.0.0.1", port)
                    for i, port in enumerate(self._decoy_ports)
                ]
            )

        def short_usage(a: Attack) -> None:
            a.sent += 2
            self._send(_register("usage", 0, "u", decoy))
            beat = {"type": "Heartbeat", "instance_id": "usage", "rank": 0, "session": "u",
                    "host": "127.0.0.1", "port": decoy, "usage": {CPU: [1, 2]}}  # fmt: skip
            self._send(msgspec.msgpack.encode(beat))

        self._every("forged Register, rank 1 of world_size 2", 0.5, reshape)
        self._every("re-Register a live rank 0 every 0.05 s", 0.05, hijack)
        self._every("forged JobDone of in-progress events", 0.5, job_done)
        self._every("heartbeats naming 1,100 addresses", 1.0, heartbeats)
        self._every("heartbeat with a short usage report", 1.0, short_usage)
        self._every("oversized and non-JSON HTTP requests", 2.0, self._http_abuse)
        self._every("Prepare flood + bad frames on a command port", 5.0, self._command_abuse)
        for thread in self._threads:
            thread.start()

    def _http_abuse(self, a: Attack) -> None:
        json_headers = {"Content-Type": "application/json"}
        ten_million, ids = TEN_MILLION_TOKENS, MILLION_WORKER_IDS

        def body_of_200_mb() -> object:
            yield b'{"tokens": ['
            for _ in range(100):
                yield b"1," * 1_000_000
            yield b"1]}"

        requests: list[tuple[str, dict[str, object]]] = [
            ("/lookup", {"content": ten_million, "headers": json_headers}),
            ("/pin", {"content": ten_million, "headers": json_headers}),
            ("/lookup", {"content": body_of_200_mb(), "headers": json_headers}),
            ("/query_worker_info", {"content": ids, "headers": json_headers}),
            ("/clear", {"content": b'{"instance_id": "load-0"}', "headers": {}}),
        ]
        for path, options in requests:
            a.sent += 1
            try:
                answer = httpx.post(self.url + path, timeout=30, **options)  # type: ignore[arg-type]
                a.saw(str(answer.status_code))
            except httpx.HTTPError as e:
                a.saw(type(e).__name__)

    def _command_abuse(self, a: Attack) -> None:
        address = f"tcp://127.0.0.1:{self._agent_ports['load-2']}"
        client = RpcClient(self._context, "attacker", PLAIN)
        client.start()
        op = cmd.TransformOp("compress", "fp8", CPU, list(range(512)))
        forever = msgspec.msgpack.encode(
            {"type": "Prepare", "event_id": "f", "op": msgspec.to_builtins(op), "ttl_s": 1e12}
        )
        payloads = [forever] * 2000
        payloads += [encode(cmd.Prepare(f"held-{a.sent}-{i}", op, 300.0)) for i in range(3000)]
        payloads += [b"\xc1 not a command"] * 2000
        futures = [client.request(address, [p], 30) for p in payloads]
        decoder = cmd.reply_decoder()
        for future in futures:
            a.sent += 1
            try:
                reply = decoder.decode(future.result(35)[0].buffer)
                a.saw("ok" if isinstance(reply, cmd.Ok) else reply.code)
            except RpcError as e:
                a.saw(type(e).__name__)
        client.close()

    def stop(self) -> dict[str, int]:
        """Stop every attack; returns what the decoy addresses received, by message kind
        (registration answers and resync requests, never a command of a hijacked worker)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        received: dict[str, int] = {}
        decoder = cmd.command_decoder()
        while self._decoys.poll(500):
            kind = type(decoder.decode(self._decoys.recv_multipart()[-1])).__name__
            received[kind] = received.get(kind, 0) + 1
        with self._push_lock:
            self._push.close(linger=0)
        self._decoys.close(linger=0)
        self._context.term()
        return received


def _register(
    instance_id: str, rank: int, session: str, port: int, world_size: int = 1
) -> mon.Register:
    return mon.Register(
        instance_id, rank, world_size, session, "127.0.0.1", port, "bench", 256, [CPU], ["fp8"]
    )


def in_progress_operations(url: str, count: int, concurrency: int = 20) -> list[str]:
    """Start `count` compress operations on the `blocked` instance (they never end)."""
    body = {"instance_id": "blocked", "method": "fp8", "location": CPU, "tokens": prompt(0)}
    events: list[str] = []
    lock = threading.Lock()
    started = time.perf_counter()

    def work(n: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            for _ in range(n):
                answer = http.post("/compress", json=body)
                if answer.status_code == 200:
                    with lock:
                        events.append(answer.json()["event_id"])

    threads = [
        threading.Thread(target=work, args=(count // concurrency,)) for _ in range(concurrency)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(
        f"started {len(events):,} compress operations that never end in "
        f"{time.perf_counter() - started:.0f} s"
    )
    return events
