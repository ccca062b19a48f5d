"""The connector's statistics as vLLM carries them: from each worker and the scheduler to
vLLM's `/metrics` (`vllm:lmc_*`) and its periodic "KV Transfer metrics" log line.

Both halves record into an `LMCConnectorStats` and hand it to vLLM once per
engine step (`get_kv_connector_stats`); vLLM sums the workers' and the
scheduler's, ships the plain `data` dict to its API server, and there calls
`LMCPromMetrics.observe` and `LMCConnectorStats.reduce`. The `data` layout
(all keys strings, so it survives vLLM's msgpack):

    {"tiers":      {tier: {"load_tokens": n, "load_bytes": n, "save_tokens": n, ...}},
     "counters":   {"lookups": n, "lookup_hits": n, "hit_tokens": n, "load_errors": n},
     "histograms": {"load_seconds": [s, ...], "save_seconds": [...], "lookup_seconds": [...]},
     "gauges":     {"tier|rank": {"used_bytes": n, "capacity_bytes": n, "chunks": n}}}

With tensor parallelism tokens are counted by rank 0 only (every rank moves
the same tokens) while bytes are summed over ranks; gauges are per rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig

PREFIX = "vllm:lmc_"
#: Per-tier counters: stats key -> help text (the metric is `vllm:lmc_<key>`, label `tier`).
TIER_COUNTERS = {
    "load_tokens": "Tokens of the chunks read from this tier for loads into vLLM (whole chunks, "
    "counted once per instance; vllm:lmc_hit_tokens counts the tokens vLLM used).",
    "load_bytes": "Bytes read from this tier for loads into vLLM, as stored (encoded size of "
    "compressed chunks), summed over ranks.",
    "save_tokens": "Tokens saved into this tier (from vLLM, or spilled from a nearer tier).",
    "save_bytes": "Bytes written into this tier, as stored, summed over ranks.",
    "save_drops": "Chunks this tier was handed to save but dropped (a full upload queue, a "
    "failing store); they stay in the nearer tiers.",
}
COUNTERS = {
    "lookups": "Requests whose prompt the scheduler looked up in the cache.",
    "lookup_hits": "Lookups that found tokens vLLM could load.",
    "hit_tokens": "Prompt tokens vLLM was told it can load from the cache.",
    "load_errors": "Loads that found fewer tokens than planned (those tokens are recomputed).",
}
#: Histograms: stats key -> (help text, buckets in seconds).
HISTOGRAMS = {
    "load_seconds": (
        "Seconds to load one request's cached tokens into vLLM's KV cache (one rank).",
        (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    ),
    "save_seconds": (
        "Seconds to save one step's new chunks from vLLM's KV cache (one rank).",
        (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    ),
    "lookup_seconds": (
        "Seconds the scheduler waited for the workers' answer to one lookup.",
        (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.0),
    ),
}
#: Per tier and rank gauges: stats key -> (metric name suffix, help text).
GAUGES = {
    "used_bytes": ("tier_used_bytes", "Bytes this tier holds on this rank."),
    "capacity_bytes": ("tier_capacity_bytes", "Capacity of this tier on this rank in bytes."),
    "chunks": ("tier_chunks", "Chunks this tier holds on this rank."),
}
#: Histogram samples kept per stats object (one log interval at most); later ones are dropped
#: from the log line's averages only, Prometheus sees every step's samples.
MAX_SAMPLES = 10_000


#: The sections of `data` (see the module docstring).
SECTIONS = ("tiers", "counters", "histograms", "gauges")


def _empty() -> dict[str, Any]:
    return {section: {} for section in SECTIONS}


@dataclass
class LMCConnectorStats(KVConnectorStats):
    """One interval's statistics; `aggregate` sums counters, extends samples, and keeps the
    latest gauges. Built by either half of the connector, or by vLLM from `data`."""

    def __post_init__(self) -> None:
        for section in SECTIONS:
            self.data.setdefault(section, {})

    def reset(self) -> None:
        self.data = _empty()

    def is_empty(self) -> bool:
        return not any(self.data.get(section) for section in SECTIONS)

    # -- recording (either half) ------------------------------------------------------------

    def add_tier(self, tier: str, counts: dict[str, int]) -> None:
        mine = self.data["tiers"].setdefault(tier, {})
        for name, value in counts.items():
            mine[name] = mine.get(name, 0) + value

    def count(self, name: str, value: int = 1) -> None:
        counters = self.data["counters"]
        counters[name] = counters.get(name, 0) + value

    def observe(self, name: str, seconds: float) -> None:
        samples = self.data["histograms"].setdefault(name, [])
        if len(samples) < MAX_SAMPLES:
            samples.append(seconds)

    def set_gauges(self, tier: str, rank: int, values: dict[str, int]) -> None:
        self.data["gauges"][f"{tier}|{rank}"] = dict(values)

    # -- vLLM's side ------------------------------------------------------------------------

    def aggregate(self, other: KVConnectorStats) -> LMCConnectorStats:
        if other.is_empty():
            return self
        data = other.data
        for tier, counts in data.get("tiers", {}).items():
            self.add_tier(tier, counts)
        for name, value in data.get("counters", {}).items():
            self.count(name, value)
        for name, samples in data.get("histograms", {}).items():
            mine = self.data["histograms"].setdefault(name, [])
            mine.extend(samples[: max(0, MAX_SAMPLES - len(mine))])
        self.data["gauges"].update(data.get("gauges", {}))
        return self

    def reduce(self) -> dict[str, int | float]:
        """The log line's figures: counters, per-tier tokens and MB, average milliseconds."""
        out: dict[str, int | float] = dict(self.data["counters"])
        for tier, counts in sorted(self.data["tiers"].items()):
            for name, value in counts.items():
                if name.endswith("_bytes"):
                    out[f"{tier}.{name.removesuffix('_bytes')}_MB"] = round(value / 1e6, 3)
                else:
                    out[f"{tier}.{name}"] = value
        for name, samples in sorted(self.data["histograms"].items()):
            if samples:
                stem = name.removesuffix("_seconds")
                out[f"{stem}_ms_avg"] = round(1000 * sum(samples) / len(samples), 3)
                out[f"{stem}_count"] = len(samples)
        for key, values in sorted(self.data["gauges"].items()):
            if values.get("capacity_bytes"):
                used = 100 * values.get("used_bytes", 0) / values["capacity_bytes"]
                out[f"{key.replace('|', '.rank')}.used_pct"] = round(used, 1)
        return out


class LMCPromMetrics(KVConnectorPromMetrics):
    """Owns the connector's Prometheus metrics in vLLM's API server (registered in vLLM's
    registry beside its own, with its `model_name` and `engine` labels). vLLM calls
    `observe` with each engine step's `data`, on its stat-logging thread."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        tier = [*labelnames, "tier"]
        # vLLM hands the metric classes in (its multiprocess-aware ones where it uses them).
        counter: Any = self._counter_cls
        gauge: Any = self._gauge_cls
        histogram: Any = self._histogram_cls
        self._tier_counters: dict[str, Any] = {
            key: counter(name=PREFIX + key, documentation=text, labelnames=tier)
            for key, text in TIER_COUNTERS.items()
        }
        self._counters: dict[str, Any] = {
            key: counter(name=PREFIX + key, documentation=text, labelnames=labelnames)
            for key, text in COUNTERS.items()
        }
        self._histograms: dict[str, Any] = {
            key: histogram(
                name=PREFIX + key, documentation=text, buckets=buckets, labelnames=labelnames
            )
            for key, (text, buckets) in HISTOGRAMS.items()
        }
        self._gauges: dict[str, Any] = {
            key: gauge(
                name=PREFIX + name,
                documentation=text,
                labelnames=[*tier, "rank"],
                multiprocess_mode="mostrecent",
            )
            for key, (name, text) in GAUGES.items()
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = self.per_engine_labelvalues[engine_idx]
        data = transfer_stats_data
        for tier, counts in data.get("tiers", {}).items():
            for key, value in counts.items():
                if key in self._tier_counters and value:
                    self._tier_counters[key].labels(*labels, tier).inc(value)
        for key, value in data.get("counters", {}).items():
            if key in self._counters and value:
                self._counters[key].labels(*labels).inc(value)
        for key, samples in data.get("histograms", {}).items():
            if key in self._histograms:
                histogram = self._histograms[key].labels(*labels)
                for seconds in samples:
                    histogram.observe(seconds)
        for where, values in data.get("gauges", {}).items():
            tier, _, rank = where.rpartition("|")
            for key, value in values.items():
                if key in self._gauges:
                    self._gauges[key].labels(*labels, tier, rank).set(value)


def exported_metric_names() -> list[str]:
    """Every sample name these metrics expose (for dashboards and their tests)."""
    names = [f"{PREFIX}{key}_total" for key in (*TIER_COUNTERS, *COUNTERS)]
    for key in HISTOGRAMS:
        names += [f"{PREFIX}{key}_{part}" for part in ("bucket", "sum", "count")]
    names += [PREFIX + name for name, _ in GAUGES.values()]
    return names
