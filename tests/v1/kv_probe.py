"""A vLLM worker extension that lets tests look inside the connector's worker half.

Pass `worker_extension_cls="tests.v1.kv_probe.KVProbe"` to `LLM(...)` and call
the methods below with `llm.collective_rpc("name")`. The recorder copies, after
each step's saves, the paged KV of every request the step loaded or saved,
straight from vLLM's blocks.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.distributed.kv_transfer import get_kv_transfer_group

from lmc_connector.cache import CacheEngine
from lmc_connector.ops import paged
from lmc_connector.v1 import LMCConnectorV1
from lmc_connector.v1.metadata import LMCConnectorMetadata
from tests.ops.paged_reference import gather_rows

_RECORDS: list[tuple[str, str, torch.Tensor]] = []


def _connector() -> LMCConnectorV1:
    connector = get_kv_transfer_group()
    assert isinstance(connector, LMCConnectorV1)
    return connector


def _record(connector: LMCConnectorV1) -> None:
    worker = connector.worker
    assert worker is not None
    meta = connector._get_connector_metadata()
    assert isinstance(meta, LMCConnectorMetadata)
    spans = [("load", s.req_id, s.end, s.block_ids) for s in meta.loads]
    spans += [("save", s.req_id, s.bounds[-1][1], s.block_ids) for s in meta.saves]
    assert worker.paged is not None
    planes = [paged.plane_views(kv, worker.paged.fmt) for kv in worker.paged.layers]
    for kind, req_id, end, block_ids in spans:
        blocks, offsets = paged.token_slots(
            block_ids, 0, end, worker.settings.block_size, worker.paged.kernel_block_size, "cpu"
        )
        _RECORDS.append((kind, req_id, gather_rows(planes, blocks, offsets)))


def _engine() -> CacheEngine:
    worker = _connector().worker
    assert worker is not None and worker.engine is not None
    return worker.engine


class KVProbe:
    def lmc_install_recorder(self) -> bool:
        connector = _connector()
        original = connector.wait_for_save

        def wait_for_save() -> None:
            original()
            _record(connector)

        connector.wait_for_save = wait_for_save  # type: ignore[method-assign]
        return True

    def lmc_take_records(self) -> list[tuple[str, str, list[int], bytes]]:
        """(kind, req_id, shape, float32 bytes) of each record; tensors travel as raw bytes."""
        records = [
            (kind, req, list(kv.shape), kv.float().contiguous().numpy().tobytes())
            for kind, req, kv in _RECORDS
        ]
        _RECORDS.clear()
        return records

    def lmc_clear(self, location: str | None = None) -> list[int]:
        """Clear every location (or one): (removed, kept pinned)."""
        return list(_engine().clear(location))

    def lmc_flush(self) -> bool:
        """Wait until every tier finished its background work (uploads to a shared store)."""
        for tier in _engine().tiers:
            tier.flush()
        return True

    def lmc_state(self) -> dict[str, Any]:
        worker = _connector().worker
        assert worker is not None and worker.engine is not None and worker.pins is not None
        return {
            "pins": worker.pins.held(),
            "chunks": {k: v.chunks for k, v in worker.engine.usage().items()},
            "layout": [
                worker.engine.layout.planes,
                worker.engine.layout.layers,
                worker.engine.layout.channels,
            ],
            "fingerprint": worker.engine.layout.fingerprint(),
        }

    def lmc_chunks(self) -> list[tuple[str | None, int]]:
        """(codec or None, bytes) of every chunk in the CPU tier, oldest first."""
        engine = _connector().worker.engine  # type: ignore[union-attr]
        assert engine is not None
        tier = engine.tier("LocalCPUBackend")
        chunks = [tier.load(key)[1] for key in tier.chunk_keys()]
        return [(c.method, c.nbytes) for c in chunks if c is not None]
