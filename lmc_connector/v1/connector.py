"""`LMCConnectorV1`: vLLM's KV connector hooks, switched on role.

The constructor builds the project config once (`load_config` over YAML,
`LMCACHE_*` and `kv_connector_extra_config`), refuses vLLM configurations this
cache would get wrong (`settings.check_supported`), and builds either an
`LMCScheduler` (SCHEDULER role, engine-core process) or an `LMCWorker` (WORKER
role, each worker process). Every hook asserts its side exists and forwards.
This module, `settings.py` and `config.py` are the only ones that read
`VllmConfig`; `requests.py` reads vLLM's per-request objects.

vLLM 0.32 / 0.33 differences handled here:
* `kv_cache_config` may be omitted by older callers (the constructor defaults it).
* 0.33 asks the connector to let go of the KV cache before sleep mode
  (`unregister_kv_caches`): pending background saves are drained.
* The workers' handshake reaches the scheduler as `set_xfer_handshake_metadata_pp_aware`
  (keyed by pipeline and tensor rank) or, from older engines, keyed by tensor rank.

Saves are copied in the background (`v1/saver.py`): `request_finished` holds a
request's blocks until `get_finished` reports its saves done, and
`handle_preemptions` stops reading a preempted request's blocks before the forward.

What vLLM sees of the connector: statistics (`get_kv_connector_stats` from each
half, `build_kv_connector_stats` and `build_prom_metrics` in vLLM's API
server; `v1/stats.py`), where cached tokens came from
(`get_external_cache_hit_sources`), KV events (`v1/events.py`), a real
`reset_cache`, and the package's log lines in vLLM's log output (`v1/logs.py`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
)

from lmc_connector.config import load_config
from lmc_connector.control.wire.security import worker_security
from lmc_connector.v1 import requests as rq
from lmc_connector.v1 import settings as vs
from lmc_connector.v1.events import EventDescriber, LMCKVEvents
from lmc_connector.v1.logs import follow_vllm_logging, log_startup
from lmc_connector.v1.lookup import LookupClient
from lmc_connector.v1.lookup_addresses import LookupHandshake, channel_path, plan_addresses
from lmc_connector.v1.metadata import LMCConnectorMetadata
from lmc_connector.v1.peers import PeerLocator
from lmc_connector.v1.scheduler import LMCScheduler
from lmc_connector.v1.stats import LMCConnectorStats, LMCPromMetrics
from lmc_connector.v1.vllm_version import note_untested_vllm
from lmc_connector.v1.worker import LMCWorker, WorkerSettings

if TYPE_CHECKING:
    from collections.abc import Iterable

    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorPromMetrics,
        KVConnectorStats,
        PromMetric,
        PromMetricT,
    )
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.metrics.cache_hit_source import CacheHitSource
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)


def _addresses(vllm_config: VllmConfig) -> list[str]:
    engine_id, dp_rank = vs.engine_id(vllm_config), vs.data_parallel_rank(vllm_config)
    return [channel_path(engine_id, dp_rank, r) for r in range(vs.world_size(vllm_config))]


def _worker_rank() -> int:
    """Global rank (pipeline stage x tensor rank); 0 where vLLM set up no process groups."""
    from vllm.distributed.parallel_state import (
        get_pp_group,
        get_tp_group,
        model_parallel_is_initialized,
    )

    if not model_parallel_is_initialized():
        return 0
    tp = get_tp_group()
    return get_pp_group().rank_in_group * tp.world_size + tp.rank_in_group


def _kv_events(vllm_config: VllmConfig) -> bool:
    events = vllm_config.kv_events_config
    return bool(events is not None and events.enable_kv_cache_events)


class LMCConnectorV1(KVConnectorBase_V1):
    """Saves prompt KV into the chunk cache of each worker and loads cached prefixes back.

    A thin switch on role: holds either the scheduler half (engine-core
    process) or the worker half (each worker process) and forwards every hook.
    """

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)  # type: ignore[arg-type]
        follow_vllm_logging()
        transfer = self._kv_transfer_config
        scheduler = role == KVConnectorRole.SCHEDULER
        if scheduler:  # once per engine; the worker processes build the same config
            note_untested_vllm()
        self.config = load_config(transfer.kv_connector_extra_config, warn_ignored=scheduler)
        self.facts = vs.check_supported(vllm_config, kv_cache_config)
        self.scheduler: LMCScheduler | None = None
        self.worker: LMCWorker | None = None
        self._lookup: LookupClient | None = None
        block_size = self.facts.block_size
        kv_events = _kv_events(vllm_config)
        log_startup(self.config, role.name.lower(), kv_events)
        if scheduler:
            # A cache miss is never fatal: failed loads are recomputed (vLLM defaults to "fail").
            if getattr(transfer, "kv_load_failure_policy", "recompute") != "recompute":
                logger.info("lmc_connector: setting kv_load_failure_policy=recompute")
                transfer.kv_load_failure_policy = "recompute"
            client = LookupClient(
                _addresses(vllm_config),
                self.config.lookup_timeout_ms,
                worker_security(self.config),
            )
            self._lookup = client
            events = EventDescriber(self.config.chunk_size) if kv_events else None
            locator = PeerLocator(self.config) if self.config.enable_p2p else None
            self.scheduler = LMCScheduler(
                self.config.chunk_size, block_size, client, events, locator
            )
            self.scheduler.start()
        else:
            rank = _worker_rank()
            settings = WorkerSettings(
                model=str(vllm_config.model_config.model),
                rank=rank,
                world_size=vs.world_size(vllm_config),
                block_size=block_size,
                lookup_address=_addresses(vllm_config)[rank],
                kv_events=kv_events,
                cache_dtype=self.facts.cache_dtype,
                model_variant=model_variant(vllm_config.model_config),
            )
            self.worker = LMCWorker(self.config, settings)

    @property
    def requires_kv_delivery(self) -> bool:
        """A best-effort cache: a dropped save is only a future miss."""
        return False

    # -- worker side -----------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self.worker is not None
        backends = {vs.attention_backend(self._vllm_config, name) for name in kv_caches}
        if len(backends) != 1:
            raise vs.UnsupportedConfiguration(
                f"layers run on several attention backends {sorted(backends)}: "
                "lmc_connector needs one KV layout for all layers"
            )
        backend = backends.pop()
        fmt = vs.layer_format(self._vllm_config, backend, self.facts)
        self.worker.register_kv_caches(kv_caches, fmt, backend)

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        """Where this worker's lookup server listens (collected by vLLM for the scheduler)."""
        assert self.worker is not None
        return self.worker.handshake()

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        """Before preempted requests' blocks are reused: stop reading them."""
        assert self.worker is not None
        assert isinstance(kv_connector_metadata, LMCConnectorMetadata)
        self.worker.before_forward(kv_connector_metadata)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self.worker is not None and isinstance(connector_metadata, LMCConnectorMetadata):
            # Also before the forward where a vLLM release has no `handle_preemptions`.
            self.worker.before_forward(connector_metadata)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self.worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, LMCConnectorMetadata)
        self.worker.start_load(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Loads finish in `start_load_kv`; nothing to wait for per layer."""
        return

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        """Saves are handed over once per step in `wait_for_save`, for all layers."""
        return

    def wait_for_save(self) -> None:
        """Hands this step's saves to the background copier and returns; their blocks stay
        allocated until `get_finished` reports the request."""
        assert self.worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, LMCConnectorMetadata)
        self.worker.save(meta)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Finished requests whose background saves are done (their blocks may be freed), and
        peer loads that ended (their requests may run)."""
        assert self.worker is not None
        saved = self.worker.finished_saves(finished_req_ids)
        return saved or None, self.worker.finished_loads(finished_req_ids) or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self.worker is not None
        return self.worker.take_load_errors()

    def get_kv_connector_kv_cache_events(self) -> LMCKVEvents | None:
        assert self.worker is not None
        return self.worker.take_events()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        """Each half's statistics since the last step (vLLM sums them)."""
        if self.worker is not None:
            return self.worker.take_stats()
        assert self.scheduler is not None
        return self.scheduler.take_stats()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats:
        return LMCConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics:
        return LMCPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def unregister_kv_caches(self) -> None:
        """vLLM 0.33 sleep mode: finish reading the paged cache before it is released."""
        if self.worker is not None:
            self.worker.drain_saves()

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.close()
        if self.scheduler is not None:
            self.scheduler.close()

    # -- scheduler side --------------------------------------------------------------------

    def set_xfer_handshake_metadata_pp_aware(
        self, metadata: dict[tuple[int, int], KVConnectorHandshakeMetadata]
    ) -> None:
        """The workers' lookup addresses, keyed by (pipeline rank, tensor rank)."""
        assert self._lookup is not None
        tp = self._vllm_config.parallel_config.tensor_parallel_size
        shakes = {
            pp * tp + rank: meta
            for (pp, rank), meta in metadata.items()
            if isinstance(meta, LookupHandshake)
        }
        self._lookup.set_addresses(plan_addresses(_addresses(self._vllm_config), shakes))

    def set_xfer_handshake_metadata(
        self, metadata: dict[int, KVConnectorHandshakeMetadata]
    ) -> None:
        self.set_xfer_handshake_metadata_pp_aware({(0, r): m for r, m in metadata.items()})

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        assert self.scheduler is not None
        if not rq.has_token_ids(request):
            return 0, False  # prompt embeddings: never keyed, never cached
        return self.scheduler.num_new_matched_tokens(
            request.request_id,
            request.prompt_token_ids,
            num_computed_tokens,
            rq.key_scope(request),
        )

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        assert self.scheduler is not None
        block_ids = list(blocks.get_block_ids()[0]) if num_external_tokens > 0 else []
        self.scheduler.after_alloc(request.request_id, num_external_tokens, block_ids)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self.scheduler is not None
        rows = rq.step_rows(scheduler_output)
        return self.scheduler.build_meta(
            rows.new, rows.cached, scheduler_output.num_scheduled_tokens, rows.preempted
        )

    def get_external_cache_hit_sources(
        self, request: Request, num_external_tokens: int
    ) -> dict[CacheHitSource, int]:
        assert self.scheduler is not None
        return self.scheduler.hit_sources(request.request_id, num_external_tokens)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """Chunk events the workers handed over, loads from peers that ended, and blocks
        that did not arrive (peers to avoid)."""
        assert self.scheduler is not None
        events = connector_output.kv_cache_events
        if isinstance(events, LMCKVEvents):
            self.scheduler.add_events(events.get_all_events())
        received = set(connector_output.finished_recving or ())
        self.scheduler.transfers_done(received, set(connector_output.invalid_block_ids or ()))
        self.scheduler.saves_reported(set(connector_output.finished_sending or ()))

    def has_pending_block_frees(self) -> bool:
        return self.scheduler is not None and self.scheduler.pending_block_frees

    def take_events(self) -> Iterable[KVCacheEvent]:
        assert self.scheduler is not None
        return self.scheduler.take_events()

    def reset_cache(self) -> bool:
        """Empty every worker's cache (vLLM's `/reset_prefix_cache?reset_external=true`)."""
        assert self.scheduler is not None
        return self.scheduler.reset(self.config.reset_shared_store)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        """Delays the release of the request's blocks while its saves are being copied."""
        assert self.scheduler is not None
        return self.scheduler.finished(request.request_id), None


def model_variant(model_config: Any) -> str:
    """The revision and quantization of the served weights, where set: two deployments of
    one model name with other weights never share KV."""
    parts = [
        f"{name}={value}"
        for name in ("revision", "quantization")
        if (value := getattr(model_config, name, None))
    ]
    return "|".join(parts)
