"""The HTTP API against a controller subprocess and in-process workers on real cache engines."""

from __future__ import annotations

from typing import Any

import httpx

from lmc_connector.tokens import KeyScope, Prompt
from tests.control.conftest import InstanceFactory, Worker
from tests.control.harness import CPU, DISK, Controller, registered, wait_until

PROMPT = list(range(100, 110))  # 10 tokens: chunks of 4, 4 and a partial 2


def lookup(http: httpx.Client, tokens: list[int]) -> dict[str, list[object]]:
    response = http.post("/lookup", json={"tokens": tokens})
    assert response.status_code == 200, response.text
    return response.json()["layout_info"]


def wait_event(http: httpx.Client, event_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        event = http.get(f"/events/{event_id}").json()
        return event if event["status"] in ("finished", "failed") else None

    return wait_until(done, what=f"event {event_id} to end")


def filled(make_instance: InstanceFactory, instance: str) -> tuple[list[Worker], dict[str, Any]]:
    """The workers of a new instance, each holding PROMPT, and a request body for it."""
    workers = make_instance(instance)
    for w in workers:
        w.fill(PROMPT)
    return workers, {"instance_id": instance, "location": CPU, "tokens": PROMPT}


def test_compress_schedules_at_once_and_event_finishes_per_worker(
    http: httpx.Client, make_instance: InstanceFactory
) -> None:
    workers, body = filled(make_instance, "compress-a")
    answer = http.post("/compress", json={**body, "method": "cachegen"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["num_tokens"] == len(PROMPT)
    event = wait_event(http, answer.json()["event_id"])
    assert event["status"] == "finished", event
    assert [p["chunks_done"] for p in event["workers"]] == [3, 3]
    assert all(all(w.encoded(PROMPT)) for w in workers)


def test_decompress_restores_plain_chunks(
    http: httpx.Client, make_instance: InstanceFactory
) -> None:
    workers, body = filled(make_instance, "decompress-a")
    body["method"] = "fp8"
    wait_event(http, http.post("/compress", json=body).json()["event_id"])
    answer = http.post("/decompress", json=body).json()
    assert answer["num_tokens"] == len(PROMPT)
    assert wait_event(http, answer["event_id"])["status"] == "finished"
    assert not any(any(w.encoded(PROMPT)) for w in workers)


def test_a_worker_with_nothing_to_do_still_shows_every_field_of_its_part(
    http: httpx.Client, make_instance: InstanceFactory
) -> None:
    _, body = filled(make_instance, "nothing-to-do")
    answer = http.post("/decompress", json={**body, "method": "fp8"})  # every chunk is plain
    event = wait_event(http, answer.json()["event_id"])
    assert event["status"] == "finished", event
    for part in event["workers"]:
        assert part["status"] == "finished"
        assert (part["chunks_done"], part["bytes_before"], part["bytes_after"]) == (0, 0, 0)
        assert {"seconds", "chunks_skipped", "errors", "rank"} <= part.keys()


def test_num_tokens_is_the_minimum_over_tensor_parallel_workers(
    http: httpx.Client, make_instance: InstanceFactory
) -> None:
    rank0, rank1 = make_instance("tp-min")
    rank0.fill(PROMPT)
    rank1.fill(PROMPT[:8])  # rank 1 holds only the first two chunks
    body = {"instance_id": "tp-min", "method": "cachegen", "location": CPU, "tokens": PROMPT}
    assert http.post("/compress", json=body).json()["num_tokens"] == 8


def test_lookup_hashes_with_each_instances_chunk_size(
    http: httpx.Client, make_instance: InstanceFactory
) -> None:
    prompt = list(range(500, 520))
    for w in make_instance("lookup-4", chunk_size=4):
        w.fill(prompt[:12])
    for w in make_instance("lookup-8", chunk_size=8):
        w.fill(prompt)

    def indexed() -> dict[str, list[object]] | None:
        info = lookup(http, prompt)
        return info if info.get("lookup-4") and info.get("lookup-8") else None

    layout = wait_until(indexed, what="both instances indexed")
    assert layout["lookup-4"] == [CPU, 12]
    assert layout["lookup-8"] == [CPU, 20]


def test_lookup_counts_only_chunks_every_rank_holds(
    http: httpx.Client, make_instance: InstanceFactory
) -> None:
    prompt = list(range(600, 616))
    rank0, rank1 = make_instance("lookup-tp")
    rank0.fill(prompt)
    rank1.fill(prompt[:4])
    wait_until(lambda: registered(str(http.base_url), "lookup-tp", 2, None), what="registration")
    wait_until(lambda: lookup(http, prompt).get("lookup-tp") == [CPU, 4], what="index of rank 1")


def test_pinned_chunks_survive_clear_until_unpinned(
    http: httpx.Client, make_instance: InstanceFactory
) -> None:
    workers = make_instance("pin-a")
    for w in workers:
        w.fill(PROMPT)
    pinned = http.post("/pin", json={"instance_id": "pin-a", "tokens": PROMPT[:8], "location": CPU})
    assert pinned.json()["num_tokens"] == 8
    cleared = http.post("/clear", json={"instance_id": "pin-a", "location": CPU}).json()
    assert (cleared["removed"], cleared["kept_pinned"]) == (2, 4)
    wait_until(lambda: lookup(http, PROMPT).get("pin-a") == [CPU, 8], what="index after clear")
    assert (
        http.post("/unpin", json={"instance_id": "pin-a", "tokens": PROMPT}).json()["num_tokens"]
        == 8
    )
    cleared = http.post("/clear", json={"instance_id": "pin-a"}).json()
    assert (cleared["removed"], cleared["kept_pinned"]) == (4, 0)
    wait_until(lambda: "pin-a" not in lookup(http, PROMPT), what="index after second clear")


def test_move_to_disk_shows_in_lookup(http: httpx.Client, make_instance: InstanceFactory) -> None:
    workers = make_instance("move-a", disk=True)
    for w in workers:
        w.fill(PROMPT)
    body = {"instance_id": "move-a", "source": CPU, "destination": DISK, "tokens": PROMPT}
    assert http.post("/move", json=body).json()["num_tokens"] == len(PROMPT)
    wait_until(lambda: lookup(http, PROMPT).get("move-a") == [DISK, 10], what="chunks on disk")


def test_unknown_instance_is_404_listing_valid_ones(
    http: httpx.Client, make_instance: InstanceFactory
) -> None:
    make_instance("known-a")
    body = {"instance_id": "nope", "method": "cachegen", "location": CPU, "tokens": [1]}
    answer = http.post("/compress", json=body)
    assert answer.status_code == 404
    assert "known-a" in answer.json()["detail"]


def test_unknown_method_and_location_are_400_listing_valid_ones(
    http: httpx.Client, make_instance: InstanceFactory
) -> None:
    make_instance("choices-a")
    body = {"instance_id": "choices-a", "method": "zip", "location": CPU, "tokens": [1]}
    answer = http.post("/compress", json=body)
    assert answer.status_code == 400 and "cachegen" in answer.json()["detail"]
    body = {**body, "method": "cachegen", "location": "GPU"}
    answer = http.post("/compress", json=body)
    assert answer.status_code == 400 and CPU in answer.json()["detail"]


def test_malformed_bodies_name_the_problem_and_leave_the_controller_running(
    http: httpx.Client,
) -> None:
    json_header = {"Content-Type": "application/json"}
    assert http.post("/lookup", content=b"{not json", headers=json_header).status_code == 400
    wrong = http.post("/lookup", json={"tokens": [1, "two"]})
    assert wrong.status_code == 422 and "$.tokens[1]" in wrong.json()["detail"]
    missing = http.post("/compress", json={"tokens": [1]})
    assert missing.status_code == 422 and "instance_id" in missing.json()["detail"]
    negative = http.post("/lookup", json={"tokens": [-1]})
    assert negative.status_code == 422
    assert http.get("/health").status_code == 200


def test_an_empty_json_body_is_an_empty_object(http: httpx.Client) -> None:
    json_header = {"Content-Type": "application/json"}
    assert http.post("/health", content=b"", headers=json_header).status_code == 200
    missing = http.post("/compress", content=b"", headers=json_header)
    assert missing.status_code == 422 and "instance_id" in missing.json()["detail"]


def test_bad_query_parameters_and_unknown_routes_answer_in_the_refusal_shape(
    http: httpx.Client,
) -> None:
    for answer, status, words in (
        (http.get("/operations", params={"limit": 0}), 422, "query limit"),
        (http.get("/controller/workers", params={"worker_id": "x"}), 422, "query worker_id"),
        (http.get("/no-such-route"), 404, "Not Found"),
    ):
        assert answer.status_code == status, answer.text
        assert answer.json().keys() == {"detail", "event_id"}
        assert words in answer.json()["detail"]


def test_a_body_that_is_not_declared_json_is_refused_before_anything_runs(
    http: httpx.Client, make_instance: InstanceFactory
) -> None:
    (worker,) = make_instance("csrf-a", world_size=1)
    worker.fill(PROMPT)
    # What a web page can send cross-origin without a preflight: text/plain.
    body = b'{"instance_id": "csrf-a"}'
    answer = http.post("/clear", content=body, headers={"Content-Type": "text/plain"})
    assert answer.status_code == 415 and "application/json" in answer.json()["detail"]
    assert worker.engine.lookup(PROMPT) == len(PROMPT)


def test_unknown_event_is_404(http: httpx.Client) -> None:
    assert http.get("/events/0123").status_code == 404
    assert http.post("/check_finish", json={"event_id": "0123"}).status_code == 404


def test_check_finish_reports_an_event(http: httpx.Client, make_instance: InstanceFactory) -> None:
    make_instance("finish-a")
    event_id = http.post("/clear", json={"instance_id": "finish-a"}).json()["event_id"]
    assert http.post("/check_finish", json={"event_id": event_id}).json()["status"] == "finished"


def test_worker_info_and_instances_describe_registered_workers(
    http: httpx.Client, make_instance: InstanceFactory
) -> None:
    make_instance("info-a", chunk_size=8)
    info = http.post("/query_worker_info", json={"instance_id": "info-a"}).json()
    assert [w["worker_id"] for w in info["worker_infos"]] == [0, 1]
    instance = next(
        i for i in http.get("/instances").json()["instances"] if i["instance_id"] == "info-a"
    )
    assert (instance["chunk_size"], instance["world_size"]) == (8, 2)
    assert "cachegen" in instance["methods"]


def test_openapi_documents_the_routes(http: httpx.Client) -> None:
    schema = http.get("/openapi.json").json()
    assert {"/compress", "/lookup", "/events/{event_id}"} <= set(schema["paths"])
    assert "TransformRequest" in schema["components"]["schemas"]
    assert http.get("/docs").status_code == 200


def test_controller_alive(controller: Controller) -> None:
    assert controller.alive()


def test_a_salted_or_adapted_prompt_is_named_by_its_cache_salt_and_lora_fields(
    http: httpx.Client, make_instance: InstanceFactory
) -> None:
    prompt = list(range(700, 712))
    salted = KeyScope(cache_salt="tenant-a")
    adapted = KeyScope(lora_name="sql", lora_path="/adapters/sql")
    (worker,) = make_instance("scoped", world_size=1)
    worker.fill(prompt, scope=salted)
    worker.fill(prompt[:8], scope=adapted)

    def found(**fields: str) -> dict[str, list[object]]:
        response = http.post("/lookup", json={"tokens": prompt, **fields})
        assert response.status_code == 200, response.text
        return response.json()["layout_info"]

    assert wait_until(lambda: found(cache_salt="tenant-a"), what="indexed") == {"scoped": [CPU, 12]}
    assert found() == {}
    assert found(cache_salt="tenant-b") == {}
    assert found(lora_name="sql", lora_path="/adapters/sql") == {"scoped": [CPU, 8]}
    assert found(lora_name="sql") == {}

    body = {"instance_id": "scoped", "tokens": prompt}
    assert http.post("/pin", json=body).json()["num_tokens"] == 0
    pinned = http.post("/pin", json={**body, "cache_salt": "tenant-a"}).json()
    assert pinned["num_tokens"] == 12
    compress = {**body, "method": "fp8", "location": CPU, "cache_salt": "tenant-a"}
    event = wait_event(http, http.post("/compress", json=compress).json()["event_id"])
    assert event["status"] == "finished" and event["num_tokens"] == 12
    tier = worker.engine.tier(CPU)
    chunks = [tier.load(key)[1] for key in worker.engine.hashes(Prompt(prompt, salted))]
    assert [c is not None and c.encoded for c in chunks] == [True, True, True]
