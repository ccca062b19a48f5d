"""LMCache's documented controller requests replayed against lmc-controller: LMCache shapes.

Each request is the body LMCache's documentation (or its API server) sends,
unchanged; each answer is checked for the fields and types LMCache's
response models have. Our own fields may come beside them. The controller
is a real subprocess; the workers are real agents on real cache engines.
`/move` in LMCache's `old_position`/`new_position` shape belongs to the peers work.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from tests.control.conftest import InstanceFactory
from tests.control.harness import CPU, Worker, wait_until

#: The seed's 12 token ids: chunks of 4 tokens, so three full chunks.
PROMPT = [128000, 849, 21435, 279, 26431, 315, 85748, 6636, 304, 4221, 4211, 13]
OTHER = [7, 8, 9, 10, 11]
#: LMCache's WorkerInfo (cache_controller/utils.py) and what /controller/workers adds.
WORKER_INFO = {
    "instance_id": str,
    "worker_id": int,
    "ip": str,
    "port": int,
    "peer_init_url": (str, type(None)),
    "registration_time": float,
    "last_heartbeat_time": float,
}


def assert_shape(answer: Any, shape: dict[str, Any]) -> None:
    """`answer` has every field of `shape`, each of its type (more fields may follow)."""
    assert isinstance(answer, dict), answer
    for field, kind in shape.items():
        assert field in answer, f"missing {field!r} in {answer}"
        assert isinstance(answer[field], kind), f"{field}={answer[field]!r} is not {kind}"


def post(http: httpx.Client, route: str, body: dict[str, Any], status: int = 200) -> Any:
    answer = http.post(route, json=body)
    assert answer.status_code == status, answer.text
    return answer.json()


def finished(http: httpx.Client, event_id: str) -> None:
    def done() -> bool:
        status = post(http, "/check_finish", {"event_id": event_id})["status"]
        assert status != "failed"
        return status == "finished"

    wait_until(done, what=f"event {event_id} to finish")


def indexed(http: httpx.Client, instance: str, tokens: list[int]) -> None:
    def found() -> bool:
        layout = post(http, "/lookup", {"tokens": tokens})["layout_info"]
        return layout.get(instance) == [CPU, len(tokens)]

    wait_until(found, what="the chunks in the controller's index")


@pytest.fixture
def instance(
    make_instance: InstanceFactory, request: pytest.FixtureRequest
) -> tuple[str, list[Worker]]:
    name = f"lmc-{request.node.name[5:30]}"
    workers = make_instance(name)
    for w in workers:
        w.fill(PROMPT)
        w.fill(OTHER, seed=5)
    return name, workers


def test_lookup_answers_layout_info(http: httpx.Client, instance: tuple[str, list[Worker]]) -> None:
    name, _ = instance
    indexed(http, name, PROMPT)
    answer = post(http, "/lookup", {"tokens": PROMPT})
    assert_shape(answer, {"event_id": str, "layout_info": dict})
    assert answer["layout_info"][name] == [CPU, 12]


def test_pin_answers_num_tokens(http: httpx.Client, instance: tuple[str, list[Worker]]) -> None:
    name, _ = instance
    body = {"tokens": PROMPT, "instance_id": name, "location": CPU}
    answer = post(http, "/pin", body)
    assert_shape(answer, {"event_id": str, "num_tokens": int})
    assert answer["num_tokens"] == 12


def test_compress_and_decompress_with_tokens_as_the_seed_sends_them(
    http: httpx.Client, instance: tuple[str, list[Worker]]
) -> None:
    name, workers = instance
    body = {"instance_id": name, "method": "cachegen", "location": CPU, "tokens": PROMPT}
    for route in ("/compress", "/decompress"):
        answer = post(http, route, body)
        assert_shape(answer, {"event_id": str, "num_tokens": int})
        assert answer["num_tokens"] == 12
        finished(http, answer["event_id"])
    assert not any(any(w.encoded(PROMPT)) for w in workers)


def test_compress_without_tokens_covers_every_chunk_in_the_location(
    http: httpx.Client, instance: tuple[str, list[Worker]]
) -> None:
    name, workers = instance
    body = {"instance_id": name, "method": "fp8", "location": CPU}
    answer = post(http, "/compress", body)
    assert_shape(answer, {"event_id": str, "num_tokens": int})
    assert answer["num_tokens"] == len(PROMPT) + len(OTHER)
    finished(http, answer["event_id"])
    assert all(all(w.encoded(PROMPT)) and all(w.encoded(OTHER)) for w in workers)
    answer = post(http, "/decompress", {**body, "tokens": None})
    assert answer["num_tokens"] == len(PROMPT) + len(OTHER)
    finished(http, answer["event_id"])
    assert not any(any(w.encoded(PROMPT)) or any(w.encoded(OTHER)) for w in workers)


def test_decompress_with_a_method_other_than_stored_is_a_400_naming_it(
    http: httpx.Client, instance: tuple[str, list[Worker]]
) -> None:
    name, workers = instance
    body = {"instance_id": name, "method": "fp8", "location": CPU, "tokens": PROMPT}
    finished(http, post(http, "/compress", body)["event_id"])
    refused = post(http, "/decompress", {**body, "method": "cachegen"}, status=400)
    assert "stored with fp8 (3 chunks), not cachegen" in refused["detail"]
    assert "decompress with method 'fp8'" in refused["detail"]
    assert all(all(w.encoded(PROMPT)) for w in workers)


def test_clear_answers_num_tokens(http: httpx.Client, instance: tuple[str, list[Worker]]) -> None:
    name, workers = instance
    answer = post(http, "/clear", {"instance_id": name, "location": CPU})
    assert_shape(answer, {"event_id": str, "num_tokens": int})
    assert answer["num_tokens"] == len(PROMPT) + len(OTHER)
    assert all(w.engine.lookup(PROMPT) == 0 for w in workers)


def test_health_answers_error_codes_per_worker(
    http: httpx.Client, instance: tuple[str, list[Worker]]
) -> None:
    name, _ = instance
    answer = post(http, "/health", {"instance_id": name})
    assert_shape(answer, {"event_id": str, "error_codes": dict})
    assert answer["error_codes"] == {"0": 0, "1": 0}


def test_query_worker_info_answers_lmcaches_worker_info(
    http: httpx.Client, instance: tuple[str, list[Worker]]
) -> None:
    name, workers = instance
    answer = post(http, "/query_worker_info", {"instance_id": name, "worker_ids": [0]})
    assert_shape(answer, {"event_id": str, "worker_infos": list})
    (info,) = answer["worker_infos"]
    assert_shape(info, WORKER_INFO)
    assert (info["instance_id"], info["worker_id"], info["ip"]) == (name, 0, "127.0.0.1")
    assert info["port"] == workers[0].agent.spec.port
    now = time.time()
    assert now - 60 < info["registration_time"] <= info["last_heartbeat_time"] <= now + 1


def test_query_instance_finds_the_instance_of_an_ip(
    http: httpx.Client, instance: tuple[str, list[Worker]]
) -> None:
    name, _ = instance
    answer = post(http, "/query_instance", {"event_id": "QueryInst-1", "ip": "127.0.0.1"})
    assert_shape(answer, {"event_id": str, "res": str})
    assert answer["event_id"] == "QueryInst-1"
    assert name in answer["instance_ids"] and answer["res"] in answer["instance_ids"]
    missing = post(http, "/query_instance", {"event_id": "q", "ip": "10.9.9.9"}, status=404)
    assert "127.0.0.1" in missing["detail"]


def test_get_controller_workers_lists_all_one_instance_or_one_worker(
    http: httpx.Client, instance: tuple[str, list[Worker]]
) -> None:
    name, _ = instance
    every = http.get("/controller/workers").json()
    assert_shape(every, {"workers": list, "total_count": int})
    assert every["total_count"] == len(every["workers"]) >= 2
    mine = http.get("/controller/workers", params={"instance_id": name}).json()
    assert [w["worker_id"] for w in mine["workers"]] == [0, 1]
    for worker in mine["workers"]:
        assert_shape(worker, {**WORKER_INFO, "key_count": int})
    one = http.get("/controller/workers", params={"instance_id": name, "worker_id": 1}).json()
    assert_shape(one, {**WORKER_INFO, "key_count": int})
    assert one["worker_id"] == 1
    wait_until(
        lambda: (
            http.get("/controller/workers", params={"instance_id": name, "worker_id": 1}).json()[
                "key_count"
            ]
            == 5
        ),
        what="worker 1's five chunks indexed",
    )
    gone = http.get("/controller/workers", params={"instance_id": name, "worker_id": 7})
    assert gone.status_code == 400 and "valid: 0, 1" in gone.json()["detail"]
    assert http.get("/controller/workers", params={"instance_id": "nope"}).status_code == 404
