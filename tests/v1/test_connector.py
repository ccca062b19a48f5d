"""A real vLLM `Scheduler` with our SCHEDULER-role connector, and a WORKER-role connector on
CPU tensors standing in for the model: each step schedules, loads, "runs the forward" (writes
a value per token into the paged cache), saves, and feeds the output back.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lmc_connector.ops import paged
from lmc_connector.ops.paged import KVFormat
from lmc_connector.v1 import LMCConnectorV1
from lmc_connector.v1.metadata import LMCConnectorMetadata
from tests.ops.paged_reference import gather_rows, scatter_rows

pytestmark = pytest.mark.vllm

BLOCK, CHUNK, NUM_BLOCKS, HEADS, HEAD = 32, 64, 40, 2, 32


class Harness:
    def __init__(self, model: Path, extra: dict[str, Any] | None = None) -> None:
        from vllm.config import (
            CacheConfig,
            DeviceConfig,
            KVTransferConfig,
            ModelConfig,
            SchedulerConfig,
            VllmConfig,
        )
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
        from vllm.v1.structured_output import StructuredOutputManager

        config = VllmConfig(
            model_config=ModelConfig(model=str(model), dtype="float32", max_model_len=1024),
            cache_config=CacheConfig(block_size=BLOCK, enable_prefix_caching=False),
            scheduler_config=SchedulerConfig(
                max_num_seqs=8,
                max_num_batched_tokens=1024,
                max_model_len=1024,
                is_encoder_decoder=False,
            ),
            device_config=DeviceConfig("cpu"),
            kv_transfer_config=KVTransferConfig(
                kv_connector="LMCConnectorV1",
                kv_connector_module_path="lmc_connector.v1",
                kv_role="kv_both",
                kv_connector_extra_config={"chunk_size": CHUNK, **(extra or {})},
            ),
        )
        config.cache_config.num_gpu_blocks = NUM_BLOCKS
        spec = FullAttentionSpec(
            block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD, dtype=torch.float32
        )
        kv_config = KVCacheConfig(
            num_blocks=NUM_BLOCKS,
            kv_cache_tensors=[],
            kv_cache_groups=[KVCacheGroupSpec(["l0", "l1"], spec)],
        )
        self.scheduler = Scheduler(config, kv_config, StructuredOutputManager(config), BLOCK)
        self.worker = LMCConnectorV1(config, KVConnectorRole.WORKER, kv_config)
        self.caches = {n: torch.zeros(NUM_BLOCKS, HEADS, BLOCK, 2 * HEAD) for n in ("l0", "l1")}
        assert self.worker.worker is not None
        self.worker.worker.register_kv_caches(self.caches, KVFormat.CPU_PAGED, "CPU_ATTN")
        self.planes = [paged.plane_views(t, KVFormat.CPU_PAGED) for t in self.caches.values()]
        self.prompts: dict[str, list[int]] = {}
        self.loads: list[tuple[str, int, int]] = []

    @property
    def engine(self) -> Any:
        assert self.worker.worker is not None and self.worker.worker.engine is not None
        return self.worker.worker.engine

    def add(self, req_id: str, prompt: list[int], max_tokens: int = 2) -> None:
        from vllm import SamplingParams
        from vllm.v1.request import Request

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        self.prompts[req_id] = prompt
        self.scheduler.add_request(Request(req_id, prompt, params, None))

    def fake_forward(self, req_id: str, block_ids: list[int], start: int, end: int) -> None:
        """Write a value per (token, position) for the tokens this step computes."""
        tokens = torch.tensor(self.prompts[req_id] + [7] * 64, dtype=torch.float32)[start:end]
        value = tokens * 1000 + torch.arange(start, end)
        kv = value.view(1, 1, -1, 1).expand(2, 2, -1, HEADS * HEAD).contiguous()
        blocks, offsets = paged.token_slots(block_ids, start, end, BLOCK, BLOCK, "cpu")
        scatter_rows(self.planes, blocks, offsets, kv)

    def step(self, drain: bool = True) -> Any:
        """One engine step; `drain`: wait for the background saves before reporting."""
        from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

        out = self.scheduler.schedule()
        meta = out.kv_connector_metadata
        assert isinstance(meta, LMCConnectorMetadata)
        self.loads += [(s.req_id, s.start, s.end) for s in meta.loads]
        self.worker.bind_connector_metadata(meta)
        self.worker.start_load_kv(None)  # type: ignore[arg-type]
        sampled = []
        for req_id, n in out.num_scheduled_tokens.items():
            request = self.scheduler.requests[req_id]
            blocks = self.scheduler.kv_cache_manager.get_block_ids(req_id)[0]
            start = request.num_computed_tokens - n
            self.fake_forward(req_id, blocks, start, start + n)
            sampled.append([7] if start + n >= request.num_prompt_tokens else [])
        self.worker.wait_for_save()
        if drain:
            self.drain_saves()
        sending, received = self.worker.get_finished(out.finished_req_ids)
        errors = self.worker.get_block_ids_with_load_errors()
        self.worker.clear_connector_metadata()
        ids = list(out.num_scheduled_tokens)
        output = ModelRunnerOutput(
            req_ids=ids,
            req_id_to_index={r: i for i, r in enumerate(ids)},
            sampled_token_ids=sampled,
            kv_connector_output=KVConnectorOutput(
                finished_sending=sending, finished_recving=received, invalid_block_ids=errors
            ),
        )
        self.scheduler.update_from_output(out, output)
        return out

    def drain_saves(self) -> None:
        """Saves run in the background; these tests look at the cache right after a step."""
        assert self.worker.worker is not None and self.worker.worker.saver is not None
        assert self.worker.worker.saver.drain()

    def run(self, max_steps: int = 20) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_requests():
                return
            self.step()
        raise AssertionError("requests did not finish")

    def close(self) -> None:
        self.worker.shutdown()
        self.scheduler.shutdown()


@pytest.fixture
def harness(tiny_model_dir: Path) -> Iterator[Harness]:
    h = Harness(tiny_model_dir)
    yield h
    h.close()


def ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 1000) for _ in range(n)]


def test_save_then_full_hit_loads_all_but_the_last_token(harness: Harness) -> None:
    prompt = ids(1, 150)  # chunks [0, 64), [64, 128) and the partial [128, 150)
    harness.add("a", prompt)
    harness.run()
    assert harness.engine.lookup(prompt) == 150
    harness.add("b", prompt)
    harness.run()
    assert harness.loads == [("b", 0, 149)]
    assert harness.engine.is_pinned(harness.engine.hashes(prompt)[0]) is False


def test_partial_hit_loads_only_the_shared_chunks(harness: Harness) -> None:
    prompt = ids(2, 200)
    harness.add("a", prompt)
    harness.run()
    other = prompt[:100] + ids(3, 60)
    harness.add("b", other)
    harness.run()
    assert harness.loads == [("b", 0, 64)]
    assert harness.engine.lookup(other) == 160  # b's own chunks were saved after the load


def test_loaded_blocks_hold_the_saved_values(harness: Harness) -> None:
    prompt = ids(4, 128)
    harness.add("a", prompt)
    harness.run()
    for t in harness.caches.values():
        t.zero_()
    harness.add("b", prompt, max_tokens=1)
    out = harness.scheduler.schedule()
    assert out.kv_connector_metadata is not None
    harness.worker.bind_connector_metadata(out.kv_connector_metadata)
    harness.worker.start_load_kv(None)  # type: ignore[arg-type]
    blocks = harness.scheduler.kv_cache_manager.get_block_ids("b")[0]
    slots = paged.token_slots(blocks, 0, 127, BLOCK, BLOCK, "cpu")
    got = gather_rows(harness.planes, *slots)[0, 0, :, 0]
    want = torch.tensor(prompt[:127], dtype=torch.float32) * 1000 + torch.arange(127)
    assert torch.equal(got, want)


def test_abort_before_load_releases_the_pins(harness: Harness) -> None:
    from vllm.v1.request import RequestStatus

    prompt = ids(5, 130)
    harness.add("a", prompt)
    harness.run()
    harness.add("b", prompt)
    harness.scheduler.schedule()  # lookup pins, metadata carries the load (not run)
    harness.scheduler.finish_requests("b", RequestStatus.FINISHED_ABORTED)
    harness.add("c", prompt)
    harness.scheduler.finish_requests("c", RequestStatus.FINISHED_ABORTED)
    assert harness.worker.worker is not None and harness.worker.worker.pins is not None
    # Pins of b go with its load; c never got scheduled, so its lookup never happened.
    assert "c" not in harness.worker.worker.pins.held()


def test_preempted_request_loads_again_on_resumption(harness: Harness) -> None:
    prompt = ids(6, 192)
    harness.add("a", prompt)
    harness.run()
    harness.add("b", prompt, max_tokens=4)
    harness.step()
    request = harness.scheduler.requests["b"]
    # What the scheduler does when it runs out of blocks (the caller pops from `running`).
    harness.scheduler.running.remove(request)
    harness.scheduler._preempt_request(request, 0.0)
    harness.run()
    assert harness.loads == [("b", 0, 191), ("b", 0, 191)]


def test_a_finished_requests_blocks_stay_until_its_saves_are_copied(harness: Harness) -> None:
    """The save thread reads vLLM's blocks after `wait_for_save` returned: vLLM must not hand
    them to another request before the worker reports the saves done."""
    pool = harness.scheduler.kv_cache_manager.block_pool
    free_before = pool.get_num_free_blocks()
    harness.add("a", ids(7, 150), max_tokens=1)
    engine = harness.engine
    with engine.lock:  # the save thread cannot store the chunks yet
        harness.step(drain=False)
        harness.step(drain=False)
        assert "a" in harness.scheduler.requests  # finished, blocks still held
        assert pool.get_num_free_blocks() < free_before
    harness.run()
    assert "a" not in harness.scheduler.requests
    assert pool.get_num_free_blocks() == free_before
    assert engine.lookup(ids(7, 150)) == 150
