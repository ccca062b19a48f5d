"""Child process of `test_peers_vllm.py`: instance B (an in-process `LLM` with the probe)
beside instance A (an OpenAI server) and one controller. Runs every step, prints one
`RESULT {json}` line. argv: model controller_url monitor_port reply_port a_url a_pid."""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

import httpx

from examples import child_result
from lmc_connector.launch import free_port
from tests.v1.test_llm import prompt_ids

if TYPE_CHECKING:
    from vllm import TokensPrompt

CHUNK = 64
PROMPT_LEN = 300


def main() -> None:
    model, controller, monitor, reply, a_url, a_pid = sys.argv[1:7]
    from vllm import LLM, SamplingParams

    worker_port, peer_port = free_port(), free_port()
    llm = LLM(
        model=model,
        worker_extension_cls="tests.v1.kv_probe.KVProbe",
        enforce_eager=True,
        block_size=32,
        max_model_len=1024,
        dtype="float32",
        enable_prefix_caching=False,
        kv_transfer_config={
            "kv_connector": "LMCConnectorV1",
            "kv_connector_module_path": "lmc_connector.v1",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {
                "chunk_size": CHUNK,
                "enable_controller": True,
                "lmcache_instance_id": "B",
                "controller_pull_url": f"127.0.0.1:{monitor}",
                "controller_reply_url": f"127.0.0.1:{reply}",
                "lmcache_worker_ports": worker_port,
                "enable_p2p": True,
                "p2p_init_ports": peer_port,
                # Generous: on a busy 2-core machine a live peer may take seconds to answer.
                "p2p_timeout_ms": 10000,
                "controller_heartbeat_interval": 0.5,
            },
        },
    )
    llm.collective_rpc("lmc_install_recorder")
    http = httpx.Client(timeout=120)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    def on_b(ids: list[int]) -> Any:
        prompt: TokensPrompt = {"prompt_token_ids": ids}
        return llm.generate([prompt], params, use_tqdm=False)[0]

    def on_a(ids: list[int]) -> str:
        body = {"model": model, "prompt": ids, "max_tokens": 8, "temperature": 0,
                "ignore_eos": True}  # fmt: skip
        return str(http.post(f"{a_url}/v1/completions", json=body).json()["choices"][0]["text"])

    def post(route: str, body: dict[str, Any]) -> dict[str, Any]:
        return dict(http.post(f"{controller}{route}", json=body).json())

    def indexed(ids: list[int], instance: str, held: bool) -> bool:
        """Wait (30 s at most) until the controller's index shows `instance` holding the
        prompt, or holding none of it."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            info = post("/lookup", {"tokens": ids})["layout_info"]
            tokens = info.get(instance, [None, 0])[1]
            if (tokens >= PROMPT_LEN) if held else tokens == 0:
                return True
            time.sleep(0.1)
        return False

    def follow(event_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + 120
        event: dict[str, Any] = {}
        while time.monotonic() < deadline:
            event = dict(http.get(f"{controller}/events/{event_id}").json())
            if event["status"] in ("finished", "failed"):
                break
            time.sleep(0.1)
        return event

    result: dict[str, Any] = {}
    # 1. A computes P1; B serves it through the peer (async load); outputs compared.
    p1 = prompt_ids(11, PROMPT_LEN)
    result["a_text"] = on_a(p1)
    result["a_held"] = indexed(p1, "A", held=True)
    llm.collective_rpc("lmc_take_records")
    fetched = on_b(p1)
    (loaded,) = llm.collective_rpc("lmc_take_records")
    result["b_cached"] = fetched.num_cached_tokens
    result["b_text"] = fetched.outputs[0].text
    # 2. Recompute on B with both caches empty: the KV it computes equals what it fetched.
    for instance in ("A", "B"):
        post("/clear", {"instance_id": instance})
    # The evictions reach the controller's index (a worker reports them with its next
    # heartbeat): A is no peer for P1 now. Asked before, B would fetch from A, fail, and
    # avoid A for the next steps.
    indexed(p1, "A", held=False)
    recomputed = on_b(p1)
    (saved,) = llm.collective_rpc("lmc_take_records")
    result["recompute_cached"] = recomputed.num_cached_tokens
    result["recompute_text"] = recomputed.outputs[0].text
    result["loaded"] = [[kind, shape, data.hex()] for kind, _, shape, data in loaded]
    result["saved"] = [[kind, shape, data.hex()] for kind, _, shape, data in saved]
    # 3. A compresses P2 with cachegen; B fetches the compressed bytes as stored.
    p2 = prompt_ids(12, PROMPT_LEN)
    on_a(p2)
    indexed(p2, "A", held=True)
    post("/clear", {"instance_id": "B"})
    scheduled = post("/compress", {"instance_id": "A", "method": "cachegen",
                                   "location": "LocalCPUBackend", "tokens": p2})  # fmt: skip
    result["compress"] = follow(scheduled["event_id"])
    result["b_compressed_cached"] = on_b(p2).num_cached_tokens
    (result["b_chunks"],) = llm.collective_rpc("lmc_chunks")
    # 4. /move in LMCache's shape, A -> B, with copy and without.
    for seed, copy in ((14, True), (15, False)):
        ids = prompt_ids(seed, PROMPT_LEN)
        on_a(ids)
        indexed(ids, "A", held=True)
        moved = post("/move", {"old_position": ["A", "LocalCPUBackend"],
                               "new_position": ["B", "LocalCPUBackend"],
                               "tokens": ids, "should_copy": copy})  # fmt: skip
        event = follow(moved["event_id"])
        time.sleep(1.0)  # chunk events reach the controller's index
        result[f"move_copy_{copy}"] = {
            "answer": moved,
            "event": event,
            "lookup": post("/lookup", {"tokens": ids})["layout_info"],
            "b_cached": on_b(ids).num_cached_tokens,
        }
    # 5. A dies with P3 cached and still listed: B's fetch fails, B recomputes and answers.
    p3 = prompt_ids(13, PROMPT_LEN)
    result["a_text_p3"] = on_a(p3)
    indexed(p3, "A", held=True)
    os.killpg(int(a_pid), signal.SIGKILL)
    started = time.perf_counter()
    after = on_b(p3)
    result["dead_peer"] = {
        "cached": after.num_cached_tokens,
        "text": after.outputs[0].text,
        "seconds": time.perf_counter() - started,
    }
    child_result.emit(result)


if __name__ == "__main__":
    main()
