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
    config: CacheConfig,
    layout: ChunkLayout,
    ctx: TierContext,
    compressor: Compressor,
    store_encoder: Compressor,
) -> list[Tier]:
    """The tiers `config` asks for, nearest first; the CPU tier spills into the disk tier and,
    with `compress_before_evict`, compresses with `compressor` before it evicts. The shared
    store (`remote_url`) comes after the local tiers: it uploads saved chunks encoded with
    `store_encoder` (a codec `remote_serde`) and reads chunks back into the CPU tier's memory."""
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
    if config.remote_url is not None:
        from lmc_connector.cache.tiers.remote import RemoteBackend
        from lmc_connector.remote_url import parse_remote_url

        remote = RemoteBackend(
            ctx,
            parse_remote_url(config.remote_url),
            layout,
            config.remote_serde,
            config.remote_timeout_ms / 1000,
            store_encoder,
        )
        if cpu is not None:
            remote.allocate = cpu.buffer
        tiers.append(remote)
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
