"""The connector's statistics as vLLM handles them: summed across workers and steps, shipped
as plain data, reduced for the log line, and recorded as `vllm:lmc_*` Prometheus metrics."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from lmc_connector.v1.connector import LMCConnectorV1
from lmc_connector.v1.stats import LMCConnectorStats, LMCPromMetrics, exported_metric_names

CPU, DISK = "LocalCPUBackend", "LocalDiskBackend"
LABELS = ["model_name", "engine"]


def worker_step(rank: int, load_tokens: int) -> LMCConnectorStats:
    stats = LMCConnectorStats()
    stats.add_tier(CPU, {"load_tokens": load_tokens, "load_bytes": 1000})
    stats.observe("load_seconds", 0.002)
    stats.set_gauges(CPU, rank, {"used_bytes": 500, "capacity_bytes": 1000, "chunks": 3})
    return stats


def test_workers_and_scheduler_add_up_and_survive_vllms_msgpack() -> None:
    scheduler = LMCConnectorStats()
    scheduler.count("lookups", 2)
    scheduler.count("hit_tokens", 255)
    total = worker_step(0, 255).aggregate(worker_step(1, 0)).aggregate(scheduler)
    # vLLM ships `to_dict()` to its API server and rebuilds it there.
    data = msgspec.msgpack.decode(msgspec.msgpack.encode(total.to_dict()))
    rebuilt = LMCConnectorV1.build_kv_connector_stats(data)
    assert rebuilt.data["tiers"][CPU] == {"load_tokens": 255, "load_bytes": 2000}
    assert rebuilt.data["counters"] == {"lookups": 2, "hit_tokens": 255}
    assert rebuilt.data["histograms"]["load_seconds"] == [0.002, 0.002]
    assert set(rebuilt.data["gauges"]) == {f"{CPU}|0", f"{CPU}|1"}
    line = rebuilt.reduce()
    assert line["lookups"] == 2
    assert line[f"{CPU}.load_tokens"] == 255
    assert line[f"{CPU}.load_MB"] == 0.002
    assert line["load_ms_avg"] == 2.0
    assert line[f"{CPU}.rank0.used_pct"] == 50.0


def test_empty_stats_are_empty_and_aggregate_to_nothing() -> None:
    empty = LMCConnectorStats()
    assert empty.is_empty()
    assert LMCConnectorStats().aggregate(empty).is_empty()
    assert not worker_step(0, 1).is_empty()


def registry_types(registry: CollectorRegistry) -> dict[Any, Any]:
    """Metric classes bound to `registry`, as vLLM hands its own classes in."""

    def bound(cls: Any) -> Any:
        return type(cls.__name__, (cls,), {"__init__": _with_registry(cls, registry)})

    return {Gauge: bound(Gauge), Counter: bound(Counter), Histogram: bound(Histogram)}


def _with_registry(cls: Any, registry: CollectorRegistry) -> Any:
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        cls.__init__(self, *args, registry=registry, **kwargs)

    return init


def test_prometheus_metrics_count_per_tier_and_rank_under_vllms_labels() -> None:
    registry = CollectorRegistry()
    metrics = LMCPromMetrics(
        SimpleNamespace(kv_transfer_config=None),  # type: ignore[arg-type]  # all it reads
        registry_types(registry),
        LABELS,
        {0: ["tiny", "0"]},
    )
    step = worker_step(0, 64).aggregate(worker_step(1, 0))
    step.add_tier(DISK, {"save_tokens": 32, "save_drops": 1})
    step.count("load_errors")
    metrics.observe(step.to_dict())
    metrics.observe(worker_step(0, 64).to_dict())
    labels = {"model_name": "tiny", "engine": "0"}
    sample = registry.get_sample_value
    assert sample("vllm:lmc_load_tokens_total", {**labels, "tier": CPU}) == 128
    assert sample("vllm:lmc_load_bytes_total", {**labels, "tier": CPU}) == 3000
    assert sample("vllm:lmc_save_drops_total", {**labels, "tier": DISK}) == 1
    assert sample("vllm:lmc_load_errors_total", labels) == 1
    assert sample("vllm:lmc_load_seconds_count", labels) == 3
    gauge = {**labels, "tier": CPU, "rank": "1"}
    assert sample("vllm:lmc_tier_used_bytes", gauge) == 500
    exposed = {s.name for f in registry.collect() for s in f.samples}
    assert {n for n in exposed if not n.endswith("_created")} <= set(exported_metric_names())
