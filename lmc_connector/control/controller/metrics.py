"""Prometheus text exposition of the controller's state, written by hand (no extra dependency)."""

from __future__ import annotations

import bisect
import threading

from lmc_connector.control.controller.state import ControllerState

#: Command latency buckets in seconds: sub-millisecond scheduling up to worker timeouts.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class LatencyHistogram:
    """Owns the command round-trip latency counts per operation kind; any thread observes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, tuple[list[int], list[float]]] = {}

    def observe(self, kind: str, seconds: float) -> None:
        with self._lock:
            buckets, total = self._data.setdefault(kind, ([0] * (len(LATENCY_BUCKETS) + 1), [0.0]))
            buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            total[0] += seconds

    def render(self, name: str) -> list[str]:
        lines = [
            f"# HELP {name} Controller-to-workers command latency (prepare and commit).",
            f"# TYPE {name} histogram",
        ]
        with self._lock:
            for kind, (buckets, total) in sorted(self._data.items()):
                running = 0
                for bound, count in zip((*LATENCY_BUCKETS, float("inf")), buckets, strict=True):
                    running += count
                    le = "+Inf" if bound == float("inf") else repr(bound)
                    lines.append(f'{name}_bucket{{kind="{kind}",le="{le}"}} {running}')
                lines.append(f'{name}_sum{{kind="{kind}"}} {total[0]}')
                lines.append(f'{name}_count{{kind="{kind}"}} {running}')
        return lines


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _gauge(name: str, help_text: str, kind: str = "gauge") -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


def render(state: ControllerState, latency: LatencyHistogram) -> str:
    """The exposition text of `state` and `latency`."""
    with state.lock:
        instances = list(state.instances.values())
        lines = _gauge("lmc_controller_instances", "Registered instances.")
        lines.append(f"lmc_controller_instances {len(instances)}")
        lines += _gauge("lmc_controller_workers", "Registered workers.")
        lines.append(f"lmc_controller_workers {sum(len(i.workers) for i in instances)}")
        lines += _gauge("lmc_controller_chunks", "Indexed chunks per worker and location.")
        for inst in instances:
            for worker in inst.workers.values():
                for location in worker.spec.locations:
                    count = state.index.count(inst.instance_id, worker.rank, location)
                    lines.append(
                        f'lmc_controller_chunks{{instance_id="{_label(inst.instance_id)}",'
                        f'worker_id="{worker.rank}",location="{_label(location)}"}} {count}'
                    )
        lines += _gauge("lmc_controller_indexed_hashes", "Distinct chunk hashes indexed.")
        lines.append(f"lmc_controller_indexed_hashes {state.index.size()}")
        lines += _gauge("lmc_controller_operations", "Tracked operations by status.")
        for status, count in state.operations.counts().items():
            lines.append(f'lmc_controller_operations{{status="{status}"}} {count}')
        lines += _gauge(
            "lmc_controller_operations_ended", "Operations ended, by kind and status.", "counter"
        )
        for (kind, status), count in sorted(state.operations.totals.items()):
            lines.append(
                f'lmc_controller_operations_ended_total{{kind="{kind}",status="{status}"}} {count}'
            )
        stats = state.stats
        for name, value, text in (
            ("messages", stats.messages, "Worker messages ingested."),
            ("chunk_events", stats.keys, "Chunk admit/evict events ingested."),
            ("malformed_messages", stats.malformed, "Malformed worker messages dropped."),
            ("ignored_messages", stats.ignored, "Messages from unknown workers ignored."),
            ("lookups", stats.lookups, "Lookups answered."),
        ):
            lines += _gauge(f"lmc_controller_{name}_total", text, "counter")
            lines.append(f"lmc_controller_{name}_total {value}")
    lines += latency.render("lmc_controller_command_seconds")
    return "\n".join(lines) + "\n"
