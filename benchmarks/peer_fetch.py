"""Peer fetch between two workers next to a plain ZMQ transfer of the same bytes, and TTFT on
instance B for a prompt that instance A computed, against recompute.

Part 1 (`transfer`): a serving process holds N chunks (Llama-3.1-8B layout by default:
2 x 32 layers x 256 tokens x 1024 channels, bf16 = 32 MiB each) behind its peer server
and, beside it, a plain ZMQ ROUTER that answers with the same tensor bytes, zero-copy, in
the same batches. This process fetches them both ways over loopback, every round fresh
chunks (distinct keys), best of rounds. The peer fetch includes what it must do beyond the
bytes: decode the header, copy each chunk into a cache buffer, admit it into the CPU tier.

Part 2 (`locate`): the scheduler's round trip to the controller that names a peer, p50/p99
over distinct prompts, 16 instances indexed.

Part 3 (`ttft`): one controller, A (vLLM's OpenAI server) and B (an `LLM` in a child), a
config-only Llama with dummy weights as in `ttft.py`. B's TTFT for a 4K-token prompt:
recomputed (no instance holds it), fetched from A (A served it first), and warm (B's own
CPU tier). Target: fetched <= 1.5 x (warm + prompt bytes at the plain ZMQ rate).
Prints figures; asserts nothing.

    python benchmarks/peer_fetch.py                  # all three parts
    python benchmarks/peer_fetch.py --part transfer --chunks 16 --rounds 5
    python benchmarks/peer_fetch.py --quick          # 4 chunks; 2K prompt, smaller model
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import zmq  # noqa: E402

from benchmarks.ttft import FULL, QUICK, _ids, bench_model, kv_bytes  # noqa: E402
from examples import child_result  # noqa: E402
from lmc_connector import launch as services  # noqa: E402
from lmc_connector.cache import CacheEngine, ChunkLayout  # noqa: E402
from lmc_connector.config import load_config  # noqa: E402
from lmc_connector.control.wire.security import ChannelSecurity  # noqa: E402
from lmc_connector.tokens import ChunkKey  # noqa: E402

LLAMA_8B = ChunkLayout("llama-3.1-8b", 1, 0, "bfloat16", 2, 32, 8 * 128, 256)
CHUNK_BYTES = 2 * 32 * 256 * 1024 * 2


def _engine(capacity_bytes: int) -> CacheEngine:
    config = load_config({"max_local_cpu_size": capacity_bytes / 1e9}, env={})
    return CacheEngine(config, LLAMA_8B)


def _serve(args: argparse.Namespace) -> None:
    """The serving worker: chunks for every round behind a peer server and a plain ROUTER."""
    from lmc_connector.cache.record import payload
    from lmc_connector.control.agent.peer_server import PeerServer

    total = args.chunks * (args.rounds + 1)
    engine = _engine(total * CHUNK_BYTES + CHUNK_BYTES)
    shape = LLAMA_8B.shape(256)
    for key in range(1, total + 1):
        engine.put(ChunkKey(key), torch.randn(shape).to(torch.bfloat16), copy=False)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    server = PeerServer(context, engine, "tcp://127.0.0.1:0", ChannelSecurity())
    server.start()
    plain = context.socket(zmq.ROUTER)
    plain_port = plain.bind_to_random_port("tcp://127.0.0.1")
    print(f"READY {server.endpoint} tcp://127.0.0.1:{plain_port}", flush=True)
    while True:  # the plain reference: [id, request id, first key, count] -> raw tensor views
        identity, rid, first, count = plain.recv_multipart()
        keys = [ChunkKey(k) for k in range(int(first), int(first) + int(count))]
        frames = [payload(c) for c in engine.stored(keys)]
        plain.send_multipart([identity, rid, *frames], copy=False)


def _plain_fetch(sock: zmq.Socket[bytes], first: int, n: int, batch: int) -> int:
    """Ask for `n` chunks from key `first` in batches, two in flight (as the peer client)."""
    pending: deque[int] = deque()
    received = 0
    asked = 0
    while received < n:
        while asked < n and len(pending) < 2:
            count = min(batch, n - asked)
            sock.send_multipart(
                [str(asked).encode(), str(first + asked).encode(), str(count).encode()]
            )
            pending.append(count)
            asked += count
        frames = sock.recv_multipart(copy=False)
        received += len(frames) - 1
        pending.popleft()
    return received


def transfer(args: argparse.Namespace) -> float:
    """Part 1; returns the plain ZMQ rate in GB/s (part 3's reference)."""
    from lmc_connector.control.agent.peer_client import PeerClient

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--child",
            "serve",
            "--chunks",
            str(args.chunks),
            "--rounds",
            str(args.rounds),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline().split()
        if not line or line[0] != "READY":
            raise RuntimeError("the serving process did not start")
        peer_url, plain_url = line[1], line[2]
        total = args.chunks * CHUNK_BYTES
        engine = _engine(total + CHUNK_BYTES)
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        client = PeerClient(context, engine, 60.0, ChannelSecurity())
        client.start()
        plain = context.socket(zmq.DEALER)
        plain.connect(plain_url)
        peer_s: list[float] = []
        plain_s: list[float] = []
        for round_ in range(args.rounds + 1):  # round 0 warms both paths up
            first = 1 + round_ * args.chunks
            keys = [ChunkKey(k) for k in range(first, first + args.chunks)]

            def peer_fetch(keys: list[ChunkKey] = keys) -> int:
                return sum(engine.admit(k, c) for k, c in client.fetch(peer_url, keys))

            def plain_fetch(first: int = first) -> int:
                return _plain_fetch(plain, first, args.chunks, client.batch)

            # Alternate which goes first, so drifts of a shared machine hit both alike.
            order: list[tuple[Callable[[], int], list[float]]] = [
                (peer_fetch, peer_s),
                (plain_fetch, plain_s),
            ]
            for fetch, times in order if round_ % 2 else order[::-1]:
                start = time.perf_counter()
                got = fetch()
                elapsed = time.perf_counter() - start
                assert got == args.chunks, got
                if round_:
                    times.append(elapsed)
            engine.clear()
        client.close()
        plain.close(linger=0)
        context.term()
    finally:
        child.kill()
        child.wait()
    rates = {
        name: (total / min(times) / 1e9, total / statistics.median(times) / 1e9)
        for name, times in (("peer", peer_s), ("plain", plain_s))
    }
    (peer_best, peer_median), (plain_best, plain_median) = rates["peer"], rates["plain"]
    print(
        f"transfer: {args.chunks} chunks of {CHUNK_BYTES / 2**20:.0f} MiB per round, "
        f"{args.rounds} rounds (distinct chunks each), batches of {client.batch}, loopback TCP"
    )
    print("                                               best      median  (GB/s)")
    print(
        f"  plain ZMQ (zero-copy send, frames received) : {plain_best:6.2f}    {plain_median:6.2f}"
    )
    print(f"  peer fetch (admitted into the CPU tier)     : {peer_best:6.2f}    {peer_median:6.2f}")
    print(
        f"  peer / plain: best {peer_best / plain_best:.0%}, median "
        f"{peer_median / plain_median:.0%} (target >= 80%)"
    )
    return plain_best


def _wait_indexed(controller: str, ids: list[int], timeout: float = 60.0) -> None:
    """Until the controller's index shows A holding every token of `ids`."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = httpx.post(f"{controller}/lookup", json={"tokens": ids}, timeout=10).json()
        if info["layout_info"].get("A", ["", 0])[1] >= len(ids):
            return
        time.sleep(0.05)
    raise RuntimeError("A's chunks never reached the controller's index")


def _b_child(args: argparse.Namespace) -> dict[str, Any]:
    import logging

    from vllm import LLM, SamplingParams, TokensPrompt

    logging.basicConfig(level=logging.INFO)  # the connector's log lines go to B's stderr

    extra = {
        "chunk_size": 256,
        "max_local_cpu_size": 4,
        "enable_controller": True,
        "lmcache_instance_id": "B",
        "controller_pull_url": f"127.0.0.1:{args.monitor}",
        "controller_reply_url": f"127.0.0.1:{args.reply}",
        "lmcache_worker_ports": services.free_port(),
        "enable_p2p": True,
        "p2p_init_ports": services.free_port(),
        "p2p_timeout_ms": 30000,
    }
    llm = LLM(
        model=args.model,
        load_format="dummy",
        dtype="bfloat16",
        enforce_eager=True,
        block_size=32,
        max_model_len=args.prompt_len + 64,
        enable_prefix_caching=False,
        max_num_batched_tokens=args.prompt_len + 64,
        kv_transfer_config={
            "kv_connector": "LMCConnectorV1",
            "kv_connector_module_path": "lmc_connector.v1",
            "kv_role": "kv_both",
            "kv_connector_extra_config": extra,
        },
    )
    one = SamplingParams(max_tokens=1, temperature=0.0)

    cached: dict[str, list[int]] = {"recompute": [], "peer": [], "warm": []}

    def ttft(ids: list[int], kind: str = "") -> float:
        start = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], one, use_tqdm=False)[0]
        if kind:
            cached[kind].append(out.num_cached_tokens or 0)
        return time.perf_counter() - start

    ttft(_ids(99, 256))
    import httpx

    result: dict[str, Any] = {"recompute": [], "peer": [], "warm": []}
    for seed in range(args.prompts):
        cold, shared = _ids(2000 + seed, args.prompt_len), _ids(3000 + seed, args.prompt_len)
        result["recompute"].append(ttft(cold, "recompute"))
        body = {"model": args.model, "prompt": shared, "max_tokens": 1}
        httpx.post(f"{args.a_url}/v1/completions", json=body, timeout=600).raise_for_status()
        _wait_indexed(args.controller, shared)
        result["peer"].append(ttft(shared, "peer"))
        result["warm"].append(ttft(shared, "warm"))
    result["cached"] = cached
    return result


def ttft_part(args: argparse.Namespace, plain_rate: float) -> None:
    shape = QUICK if args.quick else FULL
    model = bench_model(shape)
    logs = Path(tempfile.mkdtemp(prefix="lmc-peer-bench-"))
    port, monitor, reply = (services.free_port() for _ in range(3))
    controller = [
        *services.controller_command("127.0.0.1", port, monitor),
        "--reply-port",
        str(reply),
    ]
    config = logs / "a.yaml"
    config.write_text(
        f"chunk_size: 256\nmax_local_cpu_size: 4\nenable_controller: true\nlmcache_instance_id: A"
        f"\ncontroller_pull_url: 127.0.0.1:{monitor}\ncontroller_reply_url: 127.0.0.1:{reply}\n"
        f"lmcache_worker_ports: {services.free_port()}\nenable_p2p: true\n"
        f"p2p_init_ports: {services.free_port()}\n"
    )
    a_port = services.free_port()
    a_cmd = services.openai_server_command(
        model,
        a_port,
        "--load-format",
        "dummy",
        "--dtype",
        "bfloat16",
        "--enforce-eager",
        "--block-size",
        "32",
        "--max-model-len",
        str(args.prompt_len + 64),
        "--no-enable-prefix-caching",
        "--kv-transfer-config",
        json.dumps(services.CONNECTOR_CONFIG),
    )
    env = {
        "LMCACHE_CONFIG_FILE": str(config),
        "VLLM_CPU_KVCACHE_SPACE": "4",
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "1",
    }
    a_url = f"http://127.0.0.1:{a_port}"
    with (
        services.running(
            "lmc-controller",
            controller,
            f"http://127.0.0.1:{port}",
            logs / "controller.log",
            timeout=30,
        ),
        services.running("vLLM A", a_cmd, a_url, logs / "a.log", env=env, timeout=600),
    ):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "b",
            "--model",
            model,
            "--a-url",
            a_url,
            "--controller",
            f"http://127.0.0.1:{port}",
            "--monitor",
            str(monitor),
            "--reply",
            str(reply),
            "--prompt-len",
            str(args.prompt_len),
            "--prompts",
            str(args.prompts),
        ]
        # The engine core in B's own process, so that the connector's log reaches b.log.
        child_env = {
            **os.environ,
            **env,
            "PYTHONPATH": str(ROOT),
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        }
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env, timeout=3600)
    result = child_result.parse(proc.stdout)
    if result is None:
        raise RuntimeError(f"B failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    (logs / "b.log").write_text(proc.stderr)
    recompute, peer, warm = (min(result[k]) for k in ("recompute", "peer", "warm"))
    nbytes = kv_bytes(shape, args.prompt_len, "bfloat16")
    bound = warm + nbytes / (plain_rate * 1e9)
    print(
        f"ttft: Llama {shape} (dummy weights, bf16), {args.prompt_len}-token prompt, "
        f"best of {args.prompts} distinct prompts; KV {nbytes / 2**20:.0f} MiB; logs {logs}"
    )
    print(f"  B recompute (no instance holds it) : {recompute * 1000:9.1f} ms")
    print(
        f"  B fetched from A through the peer  : {peer * 1000:9.1f} ms "
        f"({recompute / peer:.1f}x faster than recompute)"
    )
    print(f"  B warm (its own CPU tier)          : {warm * 1000:9.1f} ms")
    print(f"  cached tokens per run              : {result['cached']}")
    runs = {k: [round(t * 1000, 1) for t in result[k]] for k in ("recompute", "peer", "warm")}
    print(f"  every run (ms)                     : {runs}")
    print(
        f"  target: fetched <= 1.5 x (warm + KV bytes at {plain_rate:.2f} GB/s) = "
        f"{1.5 * bound * 1000:.1f} ms -> {'met' if peer <= 1.5 * bound else 'missed'}"
    )


def locate(args: argparse.Namespace) -> None:
    """Part 2: what finding a peer adds to a lookup (one round trip to the controller)."""
    from lmc_connector.control.wire import monitor as mon
    from lmc_connector.control.wire.codec import encode
    from lmc_connector.tokens import chunk_hashes
    from lmc_connector.v1.peers import PeerLocator

    port, monitor, reply = services.free_ports(3)
    logs = Path(tempfile.mkdtemp(prefix="lmc-locate-bench-"))
    command = [*services.controller_command("127.0.0.1", port, monitor), "--reply-port", str(reply)]
    instances, prompts, chunks = 16, 200, 32
    url = f"http://127.0.0.1:{port}"
    with services.running("lmc-controller", command, url, logs / "controller.log", timeout=30):
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        push = context.socket(zmq.PUSH)
        push.connect(f"tcp://127.0.0.1:{monitor}")
        held = [_ids(7000 + i, chunks * 256) for i in range(prompts)]
        for n in range(instances + 1):  # the last one asks; the others hold every prompt
            name = f"inst-{n}"
            push.send(
                encode(
                    mon.Register(
                        name,
                        0,
                        1,
                        "s",
                        "127.0.0.1",
                        1,
                        "m",
                        256,
                        ["LocalCPUBackend"],
                        [],
                        0,
                        "127.0.0.1",
                        2000 + n,
                        "layout",
                    )
                )
            )
            keys = [] if n == instances else [k for p in held for k in chunk_hashes(p, 256)]
            push.send(encode(mon.Snapshot(name, 0, "s", {"LocalCPUBackend": keys})))
        time.sleep(2.0)
        config = load_config(
            {
                "enable_controller": True,
                "controller_pull_url": f"127.0.0.1:{monitor}",
                "lmcache_worker_ports": 1,
                "enable_p2p": True,
                "p2p_init_ports": 1,
                "controller_reply_url": f"127.0.0.1:{reply}",
                "lmcache_instance_id": f"inst-{instances}",
            },
            env={},
        )
        locator = PeerLocator(config)
        locator.start()
        asks = [chunk_hashes(p, 256) for p in held] + [
            chunk_hashes(_ids(9000 + i, chunks * 256), 256) for i in range(prompts)
        ]
        times = []
        for keys in asks * 3:
            start = time.perf_counter()
            locator.find(keys, 0)
            times.append(time.perf_counter() - start)
        locator.close()
        push.close(linger=0)
        context.term()
    times.sort()
    p50, p99 = times[len(times) // 2], times[int(len(times) * 0.99)]
    print(
        f"locate: {instances} instances holding {prompts} prompts of {chunks} chunks each; "
        f"{len(times)} lookups (half hits, half misses), one round trip each"
    )
    print(f"  p50 {p50 * 1000:.3f} ms, p99 {p99 * 1000:.3f} ms (target: adds < 2 ms)")
    print(f"  answered with a peer: {locator.found} of {locator.asked}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "transfer", "locate", "ttft"], default="all")
    parser.add_argument("--quick", action="store_true", help="4 chunks; 2K prompt, small model")
    parser.add_argument("--chunks", type=int, default=None, help="chunks per round (16)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=2, help="distinct prompts for TTFT")
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--child", choices=["serve", "b"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--a-url", help=argparse.SUPPRESS)
    parser.add_argument("--controller", help=argparse.SUPPRESS)
    parser.add_argument("--monitor", help=argparse.SUPPRESS)
    parser.add_argument("--reply", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.chunks is None:
        args.chunks = 4 if args.quick else 16
    if args.prompt_len is None:
        args.prompt_len = 2048 if args.quick else 4096
    if args.child == "serve":
        _serve(args)
        return
    if args.child == "b":
        child_result.emit(_b_child(args))
        return
    plain_rate = transfer(args) if args.part in ("all", "transfer") else 1.0
    if args.part in ("all", "locate"):
        locate(args)
    if args.part in ("all", "ttft"):
        ttft_part(args, plain_rate)


if __name__ == "__main__":
    main()
