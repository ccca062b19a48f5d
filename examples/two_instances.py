"""Two vLLM instances and one controller: B reuses what A computed, through the peer.

Builds the tiny local model if needed, starts `lmc-controller` (with `--reply-port`, where
vLLM schedulers ask which instance holds a prompt) and two vLLM OpenAI servers, A and B,
each with `enable_p2p`. Then: A computes the seed prompt; `/lookup` shows A; B serves the
same prompt from A's cache (cached tokens > 0, fetched rank for rank from A's peer server);
`/lookup` shows both instances; a second prompt computed on A is moved to B with
`/move` in LMCache's shape (`old_position`, `new_position`, `should_copy: false`) and B
serves it from its own cache while A no longer holds it. With `--with-store`, both
instances also share a Redis store (`remote_url`; a `redis-server` started here): the
store is cleared before the peer step (lookups ask the store before peers), and a third
prompt computed on A reaches B through the store, which B's `/metrics` shows
(`vllm:lmc_load_tokens_total{tier="RemoteBackend"}`). Every step prints its `curl` /
`lmc-admin` equivalent. Every process it starts is stopped on exit, Ctrl-C or failure.

    python -m examples.two_instances [--model DIR] [--free-ports] [--log-dir DIR] [--with-store]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from examples.tiny_model import sample_text
from examples.walkthrough import (
    DEFAULT_MODEL_DIR,
    Walkthrough,
    WalkthroughError,
    _cpu_args,
    build_model_if_missing,
    cached_tokens,
    curl_json,
    max_model_len,
    say,
    show,
)
from lmc_connector import launch as services

LOCATION = "LocalCPUBackend"
STORE = "RemoteBackend"
CHUNK_SIZE = 256


@dataclass
class Ports:
    controller: int = 9000
    monitor: int = 9001
    reply: int = 9002
    vllm: tuple[int, int] = (8000, 8010)
    worker: tuple[int, int] = (8001, 8011)
    peer: tuple[int, int] = (8200, 8210)

    @classmethod
    def free(cls) -> Ports:
        def port() -> int:
            return services.free_port()

        return cls(port(), port(), port(), (port(), port()), (port(), port()), (port(), port()))


def instance_config(
    name: str, index: int, ports: Ports, folder: Path, store: str | None = None
) -> Path:
    """The seed's configuration for instance `name`, with the peer keys (and the store's)."""
    path = folder / f"{name}.yaml"
    store_keys = f'remote_url: "{store}"\nremote_serde: naive\n' if store else ""
    path.write_text(
        store_keys + f"chunk_size: {CHUNK_SIZE}\nlocal_cpu: True\nmax_local_cpu_size: 5\n"
        f'enable_controller: True\nlmcache_instance_id: "{name}"\n'
        f'controller_pull_url: "localhost:{ports.monitor}"\n'
        f'controller_reply_url: "localhost:{ports.reply}"\n'
        f"lmcache_worker_ports: {ports.worker[index]}\n"
        f'enable_p2p: True\np2p_host: "localhost"\np2p_init_ports: {ports.peer[index]}\n'
        "# generous: a busy 2-core machine can keep a peer from answering for seconds\n"
        "p2p_timeout_ms: 10000\n"
    )
    return path


class TwoInstances:
    """The steps against running services: one walk-through per instance, one controller."""

    def __init__(
        self, a: Walkthrough, b: Walkthrough, servers: list[services.Service], store: bool
    ) -> None:
        self.a, self.b = a, b
        #: vLLM A and B, as started.
        self.servers = servers
        self.store = store
        self.controller = a.controller_url
        self.seen: dict[str, Any] = {}

    def lookup(self, tokens: list[int], label: str) -> dict[str, Any]:
        say(f"\n== /lookup: {label}")
        show(curl_json(f"{self.controller}/lookup", {"tokens": tokens}))
        show(f"lmc-admin --url {self.controller} lookup --tokens {','.join(map(str, tokens))}")
        layout: dict[str, Any] = self.a._post(f"{self.controller}/lookup", {"tokens": tokens})
        say(f"    -> {json.dumps(layout)}")
        return dict(layout["layout_info"])

    def wait_indexed(
        self,
        tokens: list[int],
        instances: set[str],
        where: Callable[[dict[str, Any]], bool] = lambda layout: True,
    ) -> dict[str, Any]:
        """The controller's index learns of new chunks within ~50 ms; wait until `/lookup`
        lists exactly `instances` (and `where` holds of the layout)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            body = {"tokens": tokens}
            layout = self.a._post(f"{self.controller}/lookup", body)["layout_info"]
            if set(layout) == instances and where(layout):
                return dict(layout)
            time.sleep(0.1)
        raise WalkthroughError(f"the controller never indexed {sorted(instances)}")

    def move(self, tokens: list[int]) -> dict[str, Any]:
        body = {
            "old_position": [self.a.instance_id, LOCATION],
            "new_position": [self.b.instance_id, LOCATION],
            "tokens": tokens,
            "should_copy": False,
        }
        say("\n== /move the second prompt's KV from A to B (LMCache's shape, no copy)")
        show(curl_json(f"{self.controller}/move", body))
        show(
            f"lmc-admin --url {self.controller} move --instance {self.a.instance_id} --source "
            f"{LOCATION} --to-instance {self.b.instance_id} --destination {LOCATION} "
            f"--prompt '...' --vllm-url {self.a.vllm_url} --wait"
        )
        answer = self.a._post(f"{self.controller}/move", body)
        say(f"    -> {json.dumps(answer)}")
        return self.a.follow(str(answer["event_id"]))

    def clear_store(self) -> None:
        """Empty A's chunks in the shared store, so that B's next lookup goes to the peer."""
        body = {"instance_id": self.a.instance_id, "location": STORE}
        say("\n== clear A's chunks in the shared store (lookups ask the store before peers)")
        show(curl_json(f"{self.controller}/clear", body))
        show(f"lmc-admin --url {self.controller} clear --instance A --location {STORE}")
        say(f"    -> {json.dumps(self.a._post(f'{self.controller}/clear', body))}")

    def wait_stored(self, tokens: list[int]) -> None:
        """Wait until A's background upload put every chunk of `tokens` in the store (A's
        RemoteBackend chunk count in the controller's index)."""
        body = {"instance_id": self.a.instance_id}
        chunks = -(-len(tokens) // CHUNK_SIZE)
        url = f"{self.controller}/query_worker_info"
        show(curl_json(url, body))
        before = self.a._post(url, body)["worker_infos"][0]["usage"][STORE]["chunks"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            usage = self.a._post(url, body)["worker_infos"][0]["usage"][STORE]
            if usage["chunks"] >= before + chunks or (usage["chunks"] >= chunks and not before):
                say(f"    -> A's {STORE}: {usage}")
                return
            time.sleep(0.2)
        raise WalkthroughError("A's upload to the shared store did not finish within 30 s")


def through_store(flow: TwoInstances, problems: list[str]) -> None:
    """A third prompt computed on A, then A stopped: B serves it from the shared store."""
    third = sample_text(150, start=20000)
    flow.a.complete("on A: a third prompt, uploaded to the shared store", third)
    tokens = flow.a.tokenize(third)
    flow.wait_stored(tokens)
    say("\n== stop instance A: the shared store is now the only place that holds the prompt")
    services.stop(flow.servers[0])
    answer = flow.b.complete("on B: the third prompt, from the shared store", third)
    if cached_tokens(answer) == 0:
        problems.append("B did not serve the third prompt from the shared store")
    flow.seen["store"] = cached_tokens(answer)


def run_steps(flow: TwoInstances) -> list[str]:
    """Every step; returns the broken promises (empty when all hold)."""
    a, b, problems = flow.a, flow.b, []
    first = a.complete("on A: computes and caches the prompt's KV")
    tokens = a.tokenize()
    flow.wait_indexed(tokens, {a.instance_id})
    flow.lookup(tokens, "A holds the prompt")
    if flow.store:
        flow.clear_store()
    reused = b.complete("on B: the same prompt, its KV fetched from A through the peer")
    if cached_tokens(reused) == 0:
        problems.append("B did not reuse A's KV (cached_tokens 0)")
    if reused["choices"][0]["text"] != first["choices"][0]["text"]:
        problems.append("B answered differently from A")
    flow.wait_indexed(tokens, {a.instance_id, b.instance_id})
    flow.lookup(tokens, "both instances hold it now")
    second = sample_text(200)
    a.complete("on A: a second, longer prompt", second)
    tokens2 = a.tokenize(second)
    flow.wait_indexed(tokens2, {a.instance_id})
    event = flow.move(tokens2)
    flow.seen["move"] = event
    # A's copy in the shared store (with --with-store) is not A's to move: it stays there.
    holders = {b.instance_id, *([a.instance_id] if flow.store else [])}
    after = flow.wait_indexed(
        tokens2, holders, lambda layout: not flow.store or layout[a.instance_id][0] == STORE
    )
    where = "only in the shared store" if flow.store else "no longer"
    say(f"    /lookup after the move: {json.dumps(after)} (A holds it {where})")
    moved = b.complete("on B: the second prompt, from B's own cache now", second)
    if cached_tokens(moved) == 0:
        problems.append("B did not serve the moved prompt from its cache")
    flow.seen.update(reused=cached_tokens(reused), moved=cached_tokens(moved), tokens=len(tokens))
    if flow.store:
        through_store(flow, problems)
    return problems


@contextlib.contextmanager
def started(
    model_dir: Path, ports: Ports, log_dir: Path, with_store: bool = False
) -> Iterator[TwoInstances]:
    controller_url = f"http://localhost:{ports.controller}"
    say("\n== start the controller, with the port vLLM schedulers ask for peers")
    cmd = [
        *services.controller_command("localhost", ports.controller, ports.monitor),
        "--reply-port",
        str(ports.reply),
    ]
    show("lmc-controller " + " ".join(cmd[1:]))
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            services.running("lmc-controller", cmd, controller_url, log_dir / "controller.log")
        )
        store = None
        if with_store:
            say("\n== start a Redis server, the shared store of both instances")
            redis = stack.enter_context(services.running_redis(log_dir / "redis"))
            store = redis.url
            show(f"redis-server --port {store.rsplit(':', 1)[1]}")
        flows, servers = [], []
        for index, name in enumerate(("A", "B")):
            config = instance_config(name, index, ports, log_dir, store)
            say(f"\n== start vLLM instance {name} with the connector (20-60 s on a CPU)")
            say(f"    {config}:\n      " + config.read_text().strip().replace("\n", "\n      "))
            port = ports.vllm[index]
            vcmd = services.vllm_command(
                model_dir,
                port,
                "tiny-llama",
                max_model_len=max_model_len(model_dir),
                extra_args=_cpu_args(),
            )
            show(f"LMCACHE_CONFIG_FILE={config} " + " ".join(vcmd[2:]))
            env = services.cpu_vllm_env(config)
            url = f"http://localhost:{port}"
            servers.append(
                stack.enter_context(
                    services.running(f"vLLM {name}", vcmd, url, log_dir / f"{name}.log", env=env)
                )
            )
            flows.append(Walkthrough(url, controller_url, "tiny-llama", name, ignore_eos=True))
        a, b = flows
        yield TwoInstances(a, b, servers, store=with_store)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="local model dir")
    parser.add_argument("--free-ports", action="store_true", help="pick free ports")
    parser.add_argument("--log-dir", type=Path, default=None, help="keep service logs here")
    parser.add_argument(
        "--with-store", action="store_true", help="share a Redis store too (redis-server on PATH)"
    )
    args = parser.parse_args(argv)
    ports = Ports.free() if args.free_ports else Ports()
    wanted = [ports.controller, ports.monitor, ports.reply, *ports.vllm]
    busy = [p for p in wanted if services.port_in_use(p)]
    if busy:
        say(f"ports {busy} are in use: stop what holds them, or pass --free-ports")
        return 2
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="lmc-two-instances-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        model_dir = build_model_if_missing(args.model.resolve())
        with started(model_dir, ports, log_dir, args.with_store) as flow:
            problems = run_steps(flow)
    except (WalkthroughError, services.ServiceError) as e:
        say(f"\nFAILED: {e}\nlogs: {log_dir}")
        return 1
    except KeyboardInterrupt:
        say("\ninterrupted; every process started here was stopped")
        return 130
    say("\n== report")
    say(
        f"    seed prompt tokens {flow.seen.get('tokens')}; B's cached tokens from A's KV: "
        f"{flow.seen.get('reused')}; after /move: {flow.seen.get('moved')}"
        + (f"; from the store: {flow.seen.get('store')}" if args.with_store else "")
    )
    for problem in problems:
        say(f"FAILED: {problem}")
    say(f"\nevery step held; logs: {log_dir}" if not problems else f"logs: {log_dir}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
