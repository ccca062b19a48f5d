"""The controller's Prometheus metrics: a collector over `ControllerState`, plus process metrics.

Every scrape reads the state under its lock and builds the families afresh
(nothing is copied into metric objects between scrapes). Served as
Prometheus text, or OpenMetrics when the scraper asks for it (`Accept:
application/openmetrics-text`). Names are `lmc_controller_*`; the README's
observability section says what each means and which LMCache metric matches.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from lmc_connector.control.controller.histogram import KindHistogram
from lmc_connector.control.controller.state import ControllerState

PREFIX = "lmc_controller_"
WORKER_LABELS = ["instance_id", "worker_id", "location"]
#: Ingest counters: IngestStats field -> (metric name, help).
INGEST = {
    "messages": ("messages", "Worker messages ingested."),
    "keys": ("chunk_events", "Chunk admit/evict events ingested."),
    "malformed": ("malformed_messages", "Malformed worker messages dropped."),
    "unindexed": ("unindexed_chunks", "Chunk admits left out of a full index."),
    "ignored": ("ignored_messages", "Messages from unknown worker sessions ignored."),
    "refused": ("refused_registrations", "Worker registrations refused."),
    "failed": ("failed_messages", "Worker messages whose handling failed (a bug; logged)."),
    "lookups": ("lookups", "Lookups answered (POST /lookup)."),
}


def _histogram(name: str, text: str, histogram: KindHistogram) -> HistogramMetricFamily:
    family = HistogramMetricFamily(PREFIX + name, text, labels=["kind"])
    for kind, (buckets, total) in histogram.snapshot().items():
        family.add_metric([kind], buckets, total)
    return family


class StateCollector(Collector):
    """Builds the controller's metric families from its state and command latencies at each
    scrape (the HTTP handler's worker thread); holds the state's lock while reading it."""

    def __init__(self, state: ControllerState, latency: KindHistogram) -> None:
        self._state = state
        self._latency = latency

    def collect(self) -> Iterator[Metric]:
        yield from self._fleet()
        yield from self._operations()
        yield _histogram(
            "command_seconds",
            "Controller-to-workers round trips of one operation (prepare and commit).",
            self._latency,
        )

    def _fleet(self) -> list[Metric]:
        state = self._state
        now = time.monotonic()
        instances = GaugeMetricFamily(PREFIX + "instances", "Registered instances.")
        workers = GaugeMetricFamily(
            PREFIX + "workers", "Registered workers of an instance.", labels=["instance_id"]
        )
        world = GaugeMetricFamily(
            PREFIX + "world_size", "Workers an instance has when complete.", labels=["instance_id"]
        )
        age = GaugeMetricFamily(
            PREFIX + "heartbeat_age_seconds",
            "Seconds since the controller last heard from a worker.",
            labels=["instance_id", "worker_id"],
        )
        chunks = GaugeMetricFamily(
            PREFIX + "chunks", "Indexed chunks per worker and location.", labels=WORKER_LABELS
        )
        used = GaugeMetricFamily(
            PREFIX + "tier_used_bytes",
            "Bytes a location holds on a worker (its last heartbeat).",
            labels=WORKER_LABELS,
        )
        capacity = GaugeMetricFamily(
            PREFIX + "tier_capacity_bytes",
            "Capacity of a location on a worker in bytes (its last heartbeat).",
            labels=WORKER_LABELS,
        )
        hashes = GaugeMetricFamily(PREFIX + "indexed_hashes", "Distinct chunk hashes indexed.")
        ingest = {
            field: CounterMetricFamily(PREFIX + name, text)
            for field, (name, text) in INGEST.items()
        }
        with state.lock:
            instances.add_metric([], len(state.instances))
            for inst in state.instances.values():
                iid = inst.instance_id
                workers.add_metric([iid], len(inst.workers))
                world.add_metric([iid], inst.world_size)
                for worker in inst.workers.values():
                    rank = str(worker.rank)
                    age.add_metric([iid, rank], round(now - worker.last_seen, 3))
                    for location in worker.spec.locations:
                        labels = [iid, rank, location]
                        chunks.add_metric(labels, state.index.count(iid, worker.rank, location))
                        report = worker.usage.get(location)
                        if report is not None:
                            used.add_metric(labels, report.used_bytes)
                            capacity.add_metric(labels, report.capacity_bytes)
            hashes.add_metric([], state.index.size())
            for field, family in ingest.items():
                family.add_metric([], getattr(state.stats, field))
        return [instances, workers, world, age, chunks, used, capacity, hashes, *ingest.values()]

    def _operations(self) -> list[Metric]:
        ops = self._state.operations
        active = GaugeMetricFamily(
            PREFIX + "operations_active",
            "Operations in progress, by kind and status.",
            labels=["kind", "status"],
        )
        ended = CounterMetricFamily(
            PREFIX + "operations_ended",
            "Operations ended, by kind and status (finished or failed).",
            labels=["kind", "status"],
        )
        before = CounterMetricFamily(
            PREFIX + "job_input_bytes",
            "Bytes of the chunks compress/decompress jobs rewrote, before the job.",
            labels=["kind"],
        )
        after = CounterMetricFamily(
            PREFIX + "job_output_bytes",
            "Bytes of the chunks compress/decompress jobs rewrote, after the job.",
            labels=["kind"],
        )
        saved = CounterMetricFamily(
            PREFIX + "compression_saved_bytes",
            "Bytes compress jobs freed in the workers' tiers (input minus output).",
        )
        with self._state.lock:
            for (kind, status), count in sorted(ops.active_counts().items()):
                active.add_metric([kind, status], count)
            for (kind, status), count in sorted(ops.totals.items()):
                ended.add_metric([kind, status], count)
            for kind, (bytes_in, bytes_out) in sorted(ops.job_bytes.items()):
                before.add_metric([kind], bytes_in)
                after.add_metric([kind], bytes_out)
            bytes_in, bytes_out = ops.job_bytes.get("compress", [0, 0])
            saved.add_metric([], max(0, bytes_in - bytes_out))
            jobs = _histogram(
                "job_seconds",
                "Seconds of work of one worker's compress/decompress job (the job itself, "
                "not the round trips).",
                ops.job_seconds,
            )
        return [active, ended, before, after, saved, jobs]


def build_registry(state: ControllerState, latency: KindHistogram) -> CollectorRegistry:
    """A registry of the controller's state and this process (CPU, memory, files, GC)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(StateCollector(state, latency))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def exposition(registry: CollectorRegistry, accept: str) -> tuple[bytes, str]:
    """The scrape body and its content type: OpenMetrics if `accept` asks for it."""
    encode, content_type = choose_encoder(accept)
    return encode(registry), content_type
