"""The controller's /metrics: parsed by prometheus_client's strict parsers, not grepped."""

from __future__ import annotations

import httpx
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
from prometheus_client.parser import text_string_to_metric_families as prometheus_text
from prometheus_client.samples import Sample

from tests.control.conftest import InstanceFactory
from tests.control.harness import CPU, DISK, wait_until

PROMPT = list(range(700, 720))  # 5 chunks of 4
OPENMETRICS = {"Accept": "application/openmetrics-text; version=1.0.0"}


def scrape(http: httpx.Client) -> list[Sample]:
    """Every sample of an OpenMetrics scrape; the strict parser raises on any clash or error."""
    answer = http.get("/metrics", headers=OPENMETRICS)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("application/openmetrics-text")
    return [s for family in openmetrics(answer.text) for s in family.samples]


def value(
    samples: list[Sample], name: str, default: float | None = None, /, **labels: str
) -> float:
    for s in samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    if default is not None:
        return default
    raise AssertionError(f"no sample {name}{labels}")


def test_both_formats_parse_and_every_worker_location_reports_usage(
    http: httpx.Client, make_instance: InstanceFactory
) -> None:
    workers = make_instance("metrics-usage", disk=True)
    for w in workers:
        w.fill(PROMPT)
    rank1 = {"instance_id": "metrics-usage", "worker_id": "1"}
    cpu = {"location": CPU, **rank1}

    def reported() -> list[Sample] | None:
        samples = scrape(http)
        heartbeat = value(samples, "lmc_controller_tier_used_bytes", 0.0, **cpu) > 0
        indexed = value(samples, "lmc_controller_chunks", **cpu) == 5
        return samples if heartbeat and indexed else None

    samples = wait_until(reported, what="a heartbeat and the chunk events of the filled tier")
    usage = workers[1].engine.usage()
    assert value(samples, "lmc_controller_tier_used_bytes", **cpu) == usage[CPU].used_bytes
    for location in (CPU, DISK):
        capacity = value(samples, "lmc_controller_tier_capacity_bytes", location=location, **rank1)
        assert capacity == usage[location].capacity_bytes
    assert value(samples, "lmc_controller_workers", instance_id="metrics-usage") == 2
    assert value(samples, "lmc_controller_heartbeat_age_seconds", **rank1) < 5
    # This process's own metrics come with them.
    assert value(samples, "process_resident_memory_bytes") > 0
    # The classic text format parses too, with the same families.
    families = {f.name for f in prometheus_text(http.get("/metrics").text)}
    assert {"lmc_controller_tier_used_bytes", "lmc_controller_chunks"} <= families


def test_job_durations_and_bytes_saved_come_from_the_workers_outcomes(
    http: httpx.Client, make_instance: InstanceFactory
) -> None:
    before = scrape(http)
    jobs = value(before, "lmc_controller_job_seconds_count", 0.0, kind="compress")
    saved = value(before, "lmc_controller_compression_saved_bytes_total")
    for w in make_instance("metrics-jobs"):
        w.fill(PROMPT)
    body = {"instance_id": "metrics-jobs", "method": "fp8", "location": CPU, "tokens": PROMPT}
    event_id = http.post("/compress", json=body).json()["event_id"]
    event = wait_until(
        lambda: (e := http.get(f"/events/{event_id}").json())["status"] == "finished" and e,
        what="the compress to finish",
    )
    freed = sum(p["bytes_before"] - p["bytes_after"] for p in event["workers"])
    assert freed > 0
    after = scrape(http)
    # One job per worker, timed by the worker.
    assert value(after, "lmc_controller_job_seconds_count", kind="compress") == jobs + 2
    assert value(after, "lmc_controller_job_seconds_sum", kind="compress") > 0
    assert value(after, "lmc_controller_compression_saved_bytes_total") == saved + freed
    ended = value(
        after, "lmc_controller_operations_ended_total", kind="compress", status="finished"
    )
    assert ended >= 1
    assert value(after, "lmc_controller_command_seconds_count", kind="compress") >= 1
