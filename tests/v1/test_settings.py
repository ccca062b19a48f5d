"""Configurations this connector would serve wrong KV for are refused when it is built, with
the vLLM setting to change; the block size comes from the KV cache spec.

Real `VllmConfig` objects (vLLM validates them as at start-up) and the real
connector constructor, in both roles, as vLLM's engine core and workers call it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lmc_connector.v1 import LMCConnectorV1
from lmc_connector.v1.settings import UnsupportedConfiguration

pytestmark = pytest.mark.vllm

HEADS, HEAD = 2, 32


def vllm_config(model: Path, block_size: int = 32, **parallel: Any) -> Any:
    from vllm.config import (
        CacheConfig,
        DeviceConfig,
        KVTransferConfig,
        ModelConfig,
        ParallelConfig,
        VllmConfig,
    )

    return VllmConfig(
        model_config=ModelConfig(model=str(model), dtype="float32", max_model_len=1024),
        cache_config=CacheConfig(block_size=block_size),
        device_config=DeviceConfig("cpu"),
        parallel_config=ParallelConfig(**parallel),
        kv_transfer_config=KVTransferConfig(
            kv_connector="LMCConnectorV1",
            kv_connector_module_path="lmc_connector.v1",
            kv_role="kv_both",
            kv_connector_extra_config={"chunk_size": 64},
        ),
    )


def kv_cache_config(*group_specs: Any) -> Any:
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec

    groups = [KVCacheGroupSpec([f"g{i}.l0"], spec) for i, spec in enumerate(group_specs)]
    return KVCacheConfig(num_blocks=16, kv_cache_tensors=[], kv_cache_groups=groups)


def full(block_size: int = 32) -> Any:
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    return FullAttentionSpec(
        block_size=block_size, num_kv_heads=HEADS, head_size=HEAD, dtype=torch.float32
    )


def sliding(block_size: int = 32) -> Any:
    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    return SlidingWindowSpec(
        block_size=block_size,
        num_kv_heads=HEADS,
        head_size=HEAD,
        dtype=torch.float32,
        sliding_window=128,
    )


@pytest.fixture
def connectors() -> Iterator[list[LMCConnectorV1]]:
    built: list[LMCConnectorV1] = []
    yield built
    for connector in built:
        connector.shutdown()


def build(config: Any, kv_config: Any, role_name: str, built: list[LMCConnectorV1]) -> None:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    built.append(LMCConnectorV1(config, KVConnectorRole[role_name], kv_config))


ROLES = ["SCHEDULER", "WORKER"]


@pytest.mark.parametrize("role", ROLES)
def test_decode_context_parallelism_is_refused_naming_the_flag(
    tiny_model_dir: Path, role: str, connectors: list[LMCConnectorV1]
) -> None:
    config = vllm_config(tiny_model_dir, tensor_parallel_size=4, decode_context_parallel_size=2)
    with pytest.raises(UnsupportedConfiguration, match="--decode-context-parallel-size 1"):
        build(config, kv_cache_config(full()), role, connectors)


@pytest.mark.parametrize("role", ROLES)
def test_prefill_context_parallelism_is_refused_naming_the_flag(
    tiny_model_dir: Path, role: str, connectors: list[LMCConnectorV1]
) -> None:
    config = vllm_config(tiny_model_dir)
    # vLLM's CPU model runner refuses PCP itself; the GPU runner accepts it.
    config.parallel_config.prefill_context_parallel_size = 2
    with pytest.raises(UnsupportedConfiguration, match="--prefill-context-parallel-size 1"):
        build(config, kv_cache_config(full()), role, connectors)


@pytest.mark.parametrize("role", ROLES)
def test_more_than_one_kv_cache_group_is_refused_naming_the_flag(
    tiny_model_dir: Path, role: str, connectors: list[LMCConnectorV1]
) -> None:
    config = vllm_config(tiny_model_dir)
    with pytest.raises(UnsupportedConfiguration, match="--disable-hybrid-kv-cache-manager"):
        build(config, kv_cache_config(full(), sliding()), role, connectors)


@pytest.mark.parametrize("role", ROLES)
def test_sliding_window_layers_are_refused_naming_the_flag(
    tiny_model_dir: Path, role: str, connectors: list[LMCConnectorV1]
) -> None:
    config = vllm_config(tiny_model_dir)
    with pytest.raises(UnsupportedConfiguration, match="--disable-sliding-window"):
        build(config, kv_cache_config(sliding()), role, connectors)


def test_block_size_comes_from_the_kv_cache_spec(
    tiny_model_dir: Path, connectors: list[LMCConnectorV1]
) -> None:
    """vLLM may give the KV cache manager other blocks than `--block-size` (hybrid alignment,
    MLA); block ids in the metadata count the spec's blocks."""
    config = vllm_config(tiny_model_dir, block_size=32)
    build(config, kv_cache_config(full(block_size=64)), "SCHEDULER", connectors)
    build(config, kv_cache_config(full(block_size=64)), "WORKER", connectors)
    scheduler, worker = connectors
    assert scheduler.scheduler is not None and scheduler.scheduler.block_size == 64
    assert worker.worker is not None and worker.worker.settings.block_size == 64
