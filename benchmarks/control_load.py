"""Control-plane load and fault benchmark: prints figures, asserts nothing.

A real `lmc-controller` and 16 one-worker instances of real control agents
(CPU cache engines, in a process of their own), then:

1. load: 50 concurrent HTTP clients for `--seconds` on `/lookup` (a 1K-token
   prompt), `/pin` + `/unpin` and `/check_finish`: requests per second,
   p50/p99 per route, errors, and the controller's RSS at start and end;
2. operations that never end (`--running`, beyond the controller's cap of
   10,000 in progress) on a 17th instance whose jobs are blocked;
3. the same load again while every hostile case of issue 12 is replayed
   from this host without the secret (forged registrations, a live rank
   re-registered every 50 ms, forged job completions, heartbeats naming 1,100
   addresses, short usage reports, 10M-token and 200 MB bodies, 1M worker ids,
   non-JSON bodies, Prepare floods and bad frames on a command port): the
   same table, what each attack got back, and the RSS of controller and agents.

Targets (issue 12, on a 2-core machine): 0 errors, p99 < 100 ms, RSS growth < 10 %.

    .venv/bin/python benchmarks/control_load.py [--seconds 60] [--running 12000] [--secret]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _control_agents import PROMPTS, prompt  # noqa: E402
from _hostile import Attacker, in_progress_operations  # noqa: E402

from lmc_connector.launch import free_port  # noqa: E402

INSTANCES = 16
CLIENTS = 50


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class Load:
    """Owns the latencies and errors of one load phase; `run` drives the clients."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, int] = defaultdict(int)
        #: The first answers of each kind of error, to show what went wrong.
        self.samples: dict[str, str] = {}
        self.events: list[str] = []

    async def _client(self, n: int, deadline: float) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as http:
            step = n
            while time.monotonic() < deadline:
                step += 1
                instance = f"load-{step % INSTANCES}"
                tokens = prompt(step % PROMPTS)
                kind = step % 4
                if kind in (0, 1):
                    await self._call(http, "/lookup", {"tokens": tokens})
                elif kind == 2:
                    body = {"instance_id": instance, "tokens": tokens}
                    answer = await self._call(http, "/pin", body)
                    await self._call(http, "/unpin", body)
                    if answer is not None:
                        self.events.append(answer["event_id"])
                elif self.events:  # one of the last 1,000 (older ones may be forgotten)
                    event_id = self.events[-1 - step % min(len(self.events), 1000)]
                    await self._call(http, "/check_finish", {"event_id": event_id})

    async def _call(self, http: httpx.AsyncClient, path: str, body: object) -> dict | None:
        started = time.perf_counter()
        try:
            answer = await http.post(path, json=body)
        except httpx.HTTPError:
            self.errors[path] += 1
            return None
        self.latency[path].append(time.perf_counter() - started)
        if answer.status_code != 200:
            self.errors[path] += 1
            self.samples.setdefault(f"{path} {answer.status_code}", answer.text[:300])
            return None
        return dict(answer.json())

    def run(self, seconds: float) -> float:
        deadline = time.monotonic() + seconds
        started = time.perf_counter()

        async def clients() -> None:
            await asyncio.gather(*(self._client(n, deadline) for n in range(CLIENTS)))

        asyncio.run(clients())
        return time.perf_counter() - started

    def report(self, title: str, seconds: float) -> None:
        total = sum(len(v) for v in self.latency.values())
        errors = sum(self.errors.values())
        print(f"\n{title}: {total:,} requests in {seconds:.0f} s = {total / seconds:,.0f}/s, "
              f"{errors} errors, {CLIENTS} clients")  # fmt: skip
        print("| route | requests | per s | p50 ms | p99 ms | errors |\n|---|---|---|---|---|---|")
        for path, values in sorted(self.latency.items()):
            print(
                f"| {path} | {len(values):,} | {len(values) / seconds:,.0f} | "
                f"{percentile(values, 0.5) * 1e3:.1f} | {percentile(values, 0.99) * 1e3:.1f} | "
                f"{self.errors[path]} |"
            )
        for what, text in self.samples.items():
            print(f"  first {what}: {text}")


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def agents_rss_mib(agents: subprocess.Popen[str]) -> float:
    assert agents.stdin is not None and agents.stdout is not None
    agents.stdin.write("rss\n")
    agents.stdin.flush()
    return int(agents.stdout.readline()) / 2**20


def wait_for_instances(url: str, count: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            listed = httpx.get(f"{url}/instances", timeout=5).json()["instances"]
            if sum(1 for i in listed if i["workers"]) >= count:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError("the agents did not register")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each load phase")
    parser.add_argument("--running", type=int, default=12_000, help="operations left running")
    parser.add_argument("--secret", action="store_true", help="controller and agents use CURVE")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="lmc-control-load-"))
    port, monitor_port = free_port(), free_port()
    agent_ports = [free_port() for _ in range(INSTANCES + 1)]
    secret_args: list[str] = []
    if args.secret:
        (folder / "secret").write_text("benchmark-secret-0123456789abcdef\n")
        (folder / "secret").chmod(0o600)
        secret_args = [str(folder / "secret")]
    controller = subprocess.Popen(
        [sys.executable, "-m", "lmc_connector.control.controller", "--port", str(port),
         "--monitor-port", str(monitor_port), "--log-level", "warning",
         *(["--secret-file", secret_args[0]] if secret_args else [])],
        stdout=(folder / "controller.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    agents = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "_control_agents.py"), str(monitor_port),
         ",".join(map(str, agent_ports)), *secret_args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        assert agents.stdout is not None and agents.stdout.readline().strip() == "READY"
        wait_for_instances(url, INSTANCES + 1)
        print(f"controller and {INSTANCES + 1} agents up; logs in {folder}")
        rss_idle = rss_mib(controller.pid)
        # The bounded tables (10,000 ended operations kept) fill during a warm-up first.
        Load(url).run(min(15.0, args.seconds / 4))
        rss_start = rss_mib(controller.pid), agents_rss_mib(agents)
        load = Load(url)
        load.report("load", load.run(args.seconds))
        rss_loaded = rss_mib(controller.pid)
        print(f"controller RSS {rss_idle:.0f} MiB idle, {rss_start[0]:.0f} MiB after a warm-up, "
              f"{rss_loaded:.0f} MiB after the load "
              f"({(rss_loaded / rss_start[0] - 1) * 100:+.1f} % over the run)")  # fmt: skip
        events = in_progress_operations(url, args.running)
        metrics = httpx.get(f"{url}/metrics").text
        running = [ln for ln in metrics.splitlines() if 'operations{status="running"}' in ln]
        rss_running = rss_mib(controller.pid)
        print(f"operations in progress now: {running}; controller RSS {rss_running:.0f} MiB")
        ports = {f"load-{i}": agent_ports[i] for i in range(INSTANCES)}
        attacker = Attacker(url, monitor_port, ports)
        targets = events[-50:]  # still in progress: the forged completions aim at these
        attacker.start(targets)
        hostile = Load(url)
        hostile.report("load during the hostile cases", hostile.run(args.seconds))
        received = attacker.stop()
        print("\n| attack | sent | answers |\n|---|---|---|")
        for attack in attacker.attacks:
            print(f"| {attack.name} | {attack.sent:,} | {dict(attack.answers) or 'none'} |")
        print(f"\nwhat the attacker's addresses received, by kind: {received}")
        metrics = httpx.get(f"{url}/metrics").text
        running = [ln for ln in metrics.splitlines() if 'operations{status="running"}' in ln]
        statuses: dict[str, int] = defaultdict(int)
        for event_id in targets:
            statuses[httpx.get(f"{url}/events/{event_id}").json()["status"]] += 1
        print(f"operations in progress: {running}; the {len(targets)} targeted by forged "
              f"completions: {dict(statuses)}")  # fmt: skip
        health = httpx.get(f"{url}/health").json()
        print(f"\nafter the attacks: /health {health['status']} {health['problems']}, "
              f"{health['instances']} instances, {health['workers']} workers")  # fmt: skip
        rss_end = rss_mib(controller.pid), agents_rss_mib(agents)
        print(f"controller RSS {rss_start[0]:.0f} MiB before the operations left running, "
              f"{rss_running:.0f} with them, {rss_end[0]:.0f} after the attacks "
              f"({(rss_end[0] / rss_running - 1) * 100:+.1f} % during them); agents' process "
              f"{rss_start[1]:.0f} -> {rss_end[1]:.0f} MiB")  # fmt: skip
    finally:
        if agents.stdin is not None:
            agents.stdin.close()
        agents.wait(timeout=60)
        controller.terminate()
        controller.wait(timeout=30)


if __name__ == "__main__":
    main()
