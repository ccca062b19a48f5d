"""Child process of `test_tensor_parallel.py`: TP=2 vLLM with the control agent on each rank.

Runs a prompt, repeats it, compresses its KV through the controller, runs it
again, clears the local tiers and runs it once more from the shared store
(`remote_url`, argv[5]); then calibrates kvtc on what is cached, runs a second prompt,
compresses it with kvtc and runs it again; and prints one `RESULT {json}` line. Its own
process, because vLLM tensor parallelism needs a fresh process and spawns one worker per rank.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

import httpx

from examples import child_result

if TYPE_CHECKING:
    from vllm import TokensPrompt


def main() -> None:
    model, controller_url, monitor_port, worker_port, store_url = sys.argv[1:6]
    from vllm import LLM, SamplingParams

    from tests.v1.test_llm import prompt_ids

    llm = LLM(
        model=model,
        tensor_parallel_size=2,
        enforce_eager=True,
        block_size=32,
        max_model_len=1024,
        dtype="float32",
        enable_prefix_caching=False,
        kv_transfer_config={
            "kv_connector": "LMCConnectorV1",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {
                "chunk_size": 64,
                "enable_controller": True,
                "lmcache_instance_id": "tp2",
                "controller_pull_url": f"127.0.0.1:{monitor_port}",
                "lmcache_worker_ports": int(worker_port),
                "controller_heartbeat_interval": 0.5,
                "remote_url": store_url,
            },
        },
    )
    params = SamplingParams(max_tokens=8, temperature=0.0)
    prompt: TokensPrompt = {"prompt_token_ids": prompt_ids(7, 200)}
    runs = [llm.generate([prompt], params, use_tqdm=False)[0] for _ in range(2)]
    body = {"instance_id": "tp2", "method": "cachegen", "location": "LocalCPUBackend",
            "tokens": prompt["prompt_token_ids"]}  # fmt: skip
    scheduled = httpx.post(f"{controller_url}/compress", json=body, timeout=30).json()
    event = _ended(controller_url, scheduled["event_id"])
    runs.append(llm.generate([prompt], params, use_tqdm=False)[0])
    names = _wait_for_uploads(store_url, 8)  # the heads of 4 chunks per rank
    clear = {"instance_id": "tp2", "location": "LocalCPUBackend"}
    cleared = httpx.post(f"{controller_url}/clear", json=clear, timeout=30).json()
    runs.append(llm.generate([prompt], params, use_tqdm=False)[0])
    kvtc = _calibrate_and_compress(llm, params, controller_url)
    result = {
        "cached": [r.num_cached_tokens for r in runs],
        "outputs": [list(r.outputs[0].token_ids) for r in runs],
        "scheduled": scheduled,
        "event": event,
        "cleared": cleared,
        "store_names": names,
        "kvtc": kvtc,
    }
    child_result.emit(result)


def _ended(controller_url: str, event_id: str) -> dict[str, Any]:
    deadline, event = time.monotonic() + 120, {}
    while time.monotonic() < deadline:
        event = httpx.get(f"{controller_url}/events/{event_id}", timeout=30).json()
        if event["status"] in ("finished", "failed"):
            break
        time.sleep(0.2)
    return dict(event)


def _calibrate_and_compress(llm: Any, params: Any, controller_url: str) -> dict[str, Any]:
    """Calibrate kvtc on each rank's cached KV, then serve a second prompt from kvtc chunks."""
    from tests.v1.test_llm import prompt_ids

    post = {"instance_id": "tp2", "method": "kvtc"}
    early = httpx.post(f"{controller_url}/compress", json={**post, "location": "LocalCPUBackend"},
                       timeout=30)  # fmt: skip
    calibrated = httpx.post(f"{controller_url}/calibrate", json=post, timeout=30).json()
    calibration = _ended(controller_url, calibrated["event_id"])
    prompt = {"prompt_token_ids": prompt_ids(8, 200)}
    runs = [llm.generate([prompt], params, use_tqdm=False)[0]]
    body = {**post, "location": "LocalCPUBackend", "tokens": prompt["prompt_token_ids"]}
    scheduled = httpx.post(f"{controller_url}/compress", json=body, timeout=30).json()
    compressed = _ended(controller_url, scheduled["event_id"])
    runs.append(llm.generate([prompt], params, use_tqdm=False)[0])
    return {
        "before_calibration": early.status_code,
        "calibration": calibration,
        "compress": compressed,
        "cached": [r.num_cached_tokens for r in runs],
        "outputs": [list(r.outputs[0].token_ids) for r in runs],
    }


def _wait_for_uploads(url: str, count: int) -> list[str]:
    import redis

    client = redis.Redis.from_url(url)
    deadline, names = time.monotonic() + 60, []
    while time.monotonic() < deadline:
        names = sorted(k.decode() for k in client.scan_iter("lmc:*") if k.endswith(b"}"))
        if len(names) >= count:
            break
        time.sleep(0.2)
    return names


if __name__ == "__main__":
    main()
