"""Loads from a peer instance through vLLM's own `Scheduler`: asynchronous, rank for rank.

Instance B is the real scheduler with our connector (`test_connector.Harness`, CPU tensors
standing in for the model); instance A is an in-process worker of the same layout holding
a prompt's chunks, known values per token; one real controller with `--reply-port`
connects them. While B fetches, the request waits in `WAITING_FOR_REMOTE_KVS` and other
requests keep being scheduled.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lmc_connector.launch import free_ports
from tests.control.conftest import new_controller
from tests.control.harness import Controller, Worker, engine_config, registered, wait_until
from tests.ops.paged_reference import gather_rows
from tests.v1.test_connector import BLOCK, CHUNK, HEAD, HEADS, Harness, ids

pytestmark = pytest.mark.vllm

PROMPT = ids(21, 3 * CHUNK + 10)
#: The prompt's tokens rounded up to whole blocks, as the CPU layout saves them.
PADDED = -(-len(PROMPT) // BLOCK) * BLOCK


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Controller]:
    reply = free_ports(1)[0]
    ctl = new_controller(tmp_path_factory.mktemp("peer-loads"), "--reply-port", str(reply))
    ctl.start()
    yield ctl
    ctl.stop()


def p2p(ctl: Controller, instance_id: str) -> dict[str, Any]:
    reply = ctl.args[ctl.args.index("--reply-port") + 1]
    worker, peer = free_ports(2)
    return {
        "enable_controller": True,
        "lmcache_instance_id": instance_id,
        "controller_pull_url": f"127.0.0.1:{ctl.monitor_port}",
        "controller_reply_url": f"127.0.0.1:{reply}",
        "lmcache_worker_ports": [worker],
        "enable_p2p": True,
        "p2p_init_ports": [peer],
        "p2p_timeout_ms": 2000,
        "controller_heartbeat_interval": 0.1,
    }


def values(prompt: list[int], start: int, end: int) -> torch.Tensor:
    """What `Harness.fake_forward` writes for these tokens, as chunk tensors hold it (the
    CPU layout saves whole blocks: a short last chunk is padded to a block)."""
    tokens = torch.tensor(prompt + [7] * BLOCK, dtype=torch.float32)[start:end]
    value = tokens * 1000 + torch.arange(start, end)
    return value.view(1, 1, -1, 1).expand(2, 2, -1, HEADS * HEAD).contiguous()


@pytest.fixture
def a(controller: Controller, tiny_model_dir: Path) -> Iterator[Worker]:
    """Instance A: B's layout, holding PROMPT's chunks (values a forward would write)."""
    from lmc_connector.cache import CacheEngine, ChunkLayout
    from lmc_connector.control.agent.agent import ControlAgent

    config = engine_config(
        controller.monitor_port, "A", [0], **p2p(controller, "A"), chunk_size=CHUNK
    )
    layout = ChunkLayout(
        str(tiny_model_dir), 1, 0, "float32", 2, 2, HEADS * HEAD, CHUNK, backend="CPU_ATTN"
    )
    engine = CacheEngine(config, layout)
    agent = ControlAgent(config, engine, 0, 1, str(tiny_model_dir))
    agent.start()
    for i, key in enumerate(engine.hashes(PROMPT)):
        assert engine.put(key, values(PROMPT, i * CHUNK, min((i + 1) * CHUNK, PADDED)))
    yield Worker(engine, agent)
    agent.close()


@pytest.fixture
def b(controller: Controller, tiny_model_dir: Path, a: Worker) -> Iterator[Harness]:
    harness = Harness(tiny_model_dir, p2p(controller, "B"))
    wait_until(lambda: registered(controller.url, "A", 1, 4), what="A's chunks")
    wait_until(lambda: registered(controller.url, "B", 1), what="B")
    yield harness
    harness.close()


def run(harness: Harness, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while harness.scheduler.has_unfinished_requests():
        assert time.monotonic() < deadline, "requests did not finish"
        if not harness.step().num_scheduled_tokens:
            time.sleep(0.01)  # only a fetch in flight


def test_a_prefix_held_by_a_peer_loads_asynchronously_without_stalling_others(
    b: Harness, a: Worker
) -> None:
    from vllm.v1.request import RequestStatus

    b.add("fetched", PROMPT)
    b.add("other", ids(22, 100))
    first = b.step()
    # The fetched request waits for its KV; the other one runs in the same step.
    assert "fetched" not in first.num_scheduled_tokens
    assert "other" in first.num_scheduled_tokens
    assert b.scheduler.requests["fetched"].status in (
        RequestStatus.WAITING_FOR_REMOTE_KVS,
        RequestStatus.WAITING,
    )
    assert [(r, s, e) for r, s, e in b.loads] == [("fetched", 0, len(PROMPT) - 1)]
    run(b)
    # B now holds A's chunks, bit for bit, in its own CPU tier.
    keys = b.engine.hashes(PROMPT)
    held = b.engine.stored(keys)
    assert len(held) == len(keys)
    for i, chunk in enumerate(held):
        want = values(PROMPT, i * CHUNK, min((i + 1) * CHUNK, PADDED))
        assert torch.equal(chunk.kv, want)
    assert not any(b.engine.is_pinned(k) for k in keys)


def test_fetched_kv_is_in_the_requests_blocks_when_reported_received(b: Harness) -> None:
    from lmc_connector.ops import paged

    b.add("fetched", PROMPT, max_tokens=1)
    deadline = time.monotonic() + 30
    while "fetched" not in b.scheduler.finished_recving_kv_req_ids:
        assert time.monotonic() < deadline, "the fetch never finished"
        b.step()
        time.sleep(0.01)
    blocks = b.scheduler.kv_cache_manager.get_block_ids("fetched")[0]
    slots = paged.token_slots(blocks, 0, len(PROMPT) - 1, BLOCK, BLOCK, "cpu")
    assert torch.equal(gather_rows(b.planes, *slots), values(PROMPT, 0, len(PROMPT) - 1))
    out = b.step()
    assert out.num_scheduled_tokens["fetched"] == 1  # everything but the last token loaded


def test_a_dead_peer_is_recomputed(b: Harness, a: Worker) -> None:
    assert a.agent.peer_server is not None
    a.agent.peer_server.close()
    b.add("fetched", PROMPT, max_tokens=1)
    run(b)
    computed = b.engine.stored(b.engine.hashes(PROMPT))
    assert len(computed) == 4  # B computed and saved the prompt itself
