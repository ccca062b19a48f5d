"""The locations of a worker's chunk cache, nearest first, named as in LMCache."""

from __future__ import annotations

from pathlib import Path

from lmc_connector.cache.layout import ChunkLayout
from lmc_connector.cache.tiers.base import (
    CacheEventSink,
    Marker,
    Tier,
    TierContext,
    TierUsage,
)
from lmc_connector.cache.tiers.cpu import Compressor, LocalCPUBackend
from lmc_connector.cache.tiers.disk import LocalDiskBackend
from lmc_connector.config import CacheConfig

CPU = LocalCPUBackend.name
DISK = LocalDiskBackend.name


def build_tiers(
    config: CacheConfig, layout: ChunkLayout, ctx: TierContext, compressor: Compressor
) -> list[Tier]:
    """The tiers `config` asks for, nearest first; the CPU tier spills into the disk tier and,
    with `compress_before_evict`, compresses with `compressor` before it evicts."""
    tiers: list[Tier] = []
    cpu = LocalCPUBackend(ctx, config.max_local_cpu_bytes) if config.local_cpu else None
    if cpu is not None:
        tiers.append(cpu)
        if config.compress_before_evict is not None:
            cpu.compressor = compressor
    if config.local_disk is not None:
        root = Path(config.local_disk) / layout.fingerprint()
        disk = LocalDiskBackend(ctx, root, config.max_local_disk_bytes)
        tiers.append(disk)
        if cpu is not None:
            cpu.spill_to = disk
    return tiers


__all__ = [
    "CPU",
    "DISK",
    "CacheEventSink",
    "Compressor",
    "LocalCPUBackend",
    "LocalDiskBackend",
    "Marker",
    "Tier",
    "TierContext",
    "TierUsage",
    "build_tiers",
]
