"""`POST /calibrate` and compress with `kvtc`, against a controller subprocess and in-process
workers on real cache engines (TP=2, KV per rank): calibrate first, compress after; a
restarted worker finds its calibration on disk and decodes its kvtc chunks."""

from __future__ import annotations

import re
from typing import Any

import httpx
import torch

from lmc_connector.control.agent.executor import OpExecutor
from lmc_connector.control.wire import commands as cmd
from lmc_connector.operations import JobOutcome
from lmc_connector.ops.codecs import codec_names
from tests.control.conftest import InstanceFactory
from tests.control.harness import CPU, DISK, Controller, registered, start_worker, wait_until

#: 40 tokens per rank: 10 chunks of 4, more than the 16 (2 planes x 8 channels) a fit needs.
PROMPT = list(range(300, 340))
CALIBRATION_ID = re.compile(r"^[0-9a-f]{32}$")


def wait_event(http: httpx.Client, event_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        event: dict[str, Any] = http.get(f"/events/{event_id}").json()
        return event if event["status"] in ("finished", "failed") else None

    return wait_until(done, what=f"event {event_id} to end")


def compress(http: httpx.Client, instance: str, method: str = "kvtc", **extra: Any) -> Any:
    body = {"instance_id": instance, "method": method, "location": CPU, "tokens": PROMPT}
    return http.post("/compress", json={**body, **extra})


def test_compress_with_kvtc_before_calibrating_is_a_409_that_says_how_to_calibrate(
    http: httpx.Client, make_instance: InstanceFactory
) -> None:
    workers = make_instance("cal-early")
    for w in workers:
        w.fill(PROMPT, seed=w.engine.layout.rank)
    answer = compress(http, "cal-early")
    assert answer.status_code == 409, answer.text
    detail = answer.json()["detail"]
    assert "POST /calibrate" in detail and "lmc-admin calibrate --instance cal-early" in detail
    assert not any(any(w.encoded(PROMPT)) for w in workers)


def test_the_worker_itself_refuses_kvtc_before_calibration_at_prepare_time(
    make_instance: InstanceFactory,
) -> None:
    (worker,) = make_instance("cal-prepare", world_size=1)
    worker.fill(PROMPT)
    done: list[JobOutcome] = []
    executor = OpExecutor(worker.engine, codec_names(), lambda _, outcome: done.append(outcome))
    op = cmd.TransformOp("compress", "kvtc", CPU, PROMPT)
    reply = executor.prepare(cmd.Prepare("e-kvtc", op, ttl_s=5))
    executor.close()
    assert isinstance(reply, cmd.Failed) and reply.code == "conflict", reply
    assert "POST /calibrate" in reply.error
    assert not any(worker.engine.is_pinned(k) for k in worker.engine.hashes(PROMPT))


def test_calibrate_fits_on_each_workers_cache_then_kvtc_compresses_and_decompresses(
    http: httpx.Client, make_instance: InstanceFactory
) -> None:
    workers = make_instance("cal-a")
    for w in workers:
        w.fill(PROMPT, seed=w.engine.layout.rank)
    answer = http.post("/calibrate", json={"instance_id": "cal-a"})  # method: kvtc by default
    assert answer.status_code == 200, answer.text
    assert answer.json()["num_tokens"] == len(PROMPT)
    event = wait_event(http, answer.json()["event_id"])
    assert (event["status"], event["kind"], event["method"]) == ("finished", "calibrate", "kvtc")
    ids = [part["calibration_id"] for part in event["workers"]]
    assert all(CALIBRATION_ID.match(i) for i in ids) and ids[0] != ids[1]  # KV per rank
    assert [part["chunks_done"] for part in event["workers"]] == [10, 10]
    assert all(part["bytes_after"] > 0 for part in event["workers"])
    listed = http.get("/controller/workers", params={"instance_id": "cal-a"}).json()["workers"]
    assert [w["calibrations"] for w in listed] == [{"kvtc": i} for i in ids]

    compressed = compress(http, "cal-a")
    assert compressed.status_code == 200, compressed.text
    assert wait_event(http, compressed.json()["event_id"])["status"] == "finished"
    assert all(all(w.encoded(PROMPT)) for w in workers)
    decompressed = http.post(
        "/decompress",
        json={"instance_id": "cal-a", "method": "kvtc", "location": CPU, "tokens": PROMPT},
    )
    assert wait_event(http, decompressed.json()["event_id"])["status"] == "finished"
    assert not any(any(w.encoded(PROMPT)) for w in workers)


def test_calibrating_a_codec_that_needs_none_is_a_400_naming_the_one_that_does(
    http: httpx.Client, make_instance: InstanceFactory
) -> None:
    make_instance("cal-fp8", world_size=1)
    answer = http.post("/calibrate", json={"instance_id": "cal-fp8", "method": "fp8"})
    assert answer.status_code == 400
    assert "valid: kvtc" in answer.json()["detail"]


def test_calibrating_on_too_little_cached_kv_is_a_409_that_says_to_send_prompts(
    http: httpx.Client, make_instance: InstanceFactory
) -> None:
    (worker,) = make_instance("cal-few", world_size=1)
    worker.fill(PROMPT[:8])
    answer = http.post("/calibrate", json={"instance_id": "cal-few"})
    assert answer.status_code == 409, answer.text
    assert "send more prompts first" in answer.json()["detail"]
    assert worker.engine.calibrations.current_ids() == {}


def test_a_restarted_worker_decodes_its_kvtc_chunks_from_disk_and_needs_no_new_calibration(
    http: httpx.Client, make_instance: InstanceFactory, controller: Controller
) -> None:
    (worker,) = make_instance("cal-restart", world_size=1, disk=True)
    worker.fill(PROMPT)
    keys = worker.engine.hashes(PROMPT)
    calibrated = wait_event(http, http.post("/calibrate", json={"instance_id": "cal-restart"})
                            .json()["event_id"])  # fmt: skip
    calibration = calibrated["workers"][0]["calibration_id"]
    moved = {"instance_id": "cal-restart", "source": CPU, "destination": DISK, "tokens": PROMPT}
    assert http.post("/move", json=moved).json()["num_tokens"] == len(PROMPT)
    done = wait_event(http, compress(http, "cal-restart", location=DISK).json()["event_id"])
    assert done["workers"][0]["chunks_done"] == 10
    served = worker.engine.get(keys)
    config = worker.engine.config
    worker.agent.close()
    worker.engine.close()

    again = start_worker(config, 0, 1)  # a new engine over the same disk folder
    try:
        wait_until(lambda: registered(controller.url, "cal-restart", 1), what="re-registration")
        assert again.engine.calibrations.current_ids() == {"kvtc": calibration}
        reloaded = again.engine.get(keys)
        assert len(reloaded) == len(keys)
        assert all(torch.equal(a, b) for a, b in zip(reloaded, served, strict=True))
        fresh = list(range(400, 440))
        again.fill(fresh, seed=7)
        answer = compress(http, "cal-restart", tokens=fresh)
        assert answer.status_code == 200, answer.text
        assert wait_event(http, answer.json()["event_id"])["workers"][0]["chunks_done"] == 10
        assert all(again.encoded(fresh))
    finally:
        again.agent.close()
        again.engine.close()
