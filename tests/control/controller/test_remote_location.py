"""The shared store (RemoteBackend) through the HTTP API: index, lookup, compress, clear.

In-process workers of two-rank instances write to this module's real
redis-server; the controller indexes what each instance wrote there.
"""

from __future__ import annotations

import httpx
import redis

from lmc_connector.launch import Service
from tests.control.conftest import InstanceFactory
from tests.control.controller.test_http_api import PROMPT, lookup, wait_event
from tests.control.harness import CPU, Worker, wait_until

REMOTE = "RemoteBackend"


def fill_and_upload(workers: list[Worker]) -> None:
    for worker in workers:
        worker.fill(PROMPT)
        worker.engine.tier(REMOTE).flush()


def test_lookup_shows_the_store_chunks_an_instance_wrote(
    http: httpx.Client, make_instance: InstanceFactory, redis_server: Service, store: redis.Redis
) -> None:
    writer = make_instance("store-writer", remote_url=redis_server.url)
    fill_and_upload(writer)
    reader = make_instance("store-reader", remote_url=redis_server.url)
    assert [w.engine.lookup(PROMPT) for w in reader] == [len(PROMPT)] * 2  # it can read them
    cleared = http.post("/clear", json={"instance_id": "store-writer", "location": CPU}).json()
    assert cleared["removed"] == 6
    wait_until(
        lambda: lookup(http, PROMPT).get("store-writer") == [REMOTE, len(PROMPT)],
        what="the writer's store chunks in the index",
    )
    assert "store-reader" not in lookup(http, PROMPT)  # it did not write them


def test_compress_and_decompress_in_the_store(
    http: httpx.Client, make_instance: InstanceFactory, redis_server: Service, store: redis.Redis
) -> None:
    workers = make_instance("store-compress", remote_url=redis_server.url)
    fill_and_upload(workers)
    body = {"instance_id": "store-compress", "method": "cachegen", "location": REMOTE,
            "tokens": PROMPT}  # fmt: skip
    answer = http.post("/compress", json=body).json()
    assert answer["num_tokens"] == len(PROMPT)
    event = wait_event(http, answer["event_id"])
    assert event["status"] == "finished", event
    assert [w["chunks_done"] for w in event["workers"]] == [3, 3]
    assert all(all(w.encoded(PROMPT, REMOTE)) for w in workers)
    answer = http.post("/decompress", json=body).json()
    assert wait_event(http, answer["event_id"])["status"] == "finished"
    assert not any(any(w.encoded(PROMPT, REMOTE)) for w in workers)


def test_clear_of_the_store_location_removes_the_instances_layout_only(
    http: httpx.Client, make_instance: InstanceFactory, redis_server: Service, store: redis.Redis
) -> None:
    workers = make_instance("store-clear", remote_url=redis_server.url)
    fill_and_upload(workers)
    store.set("someone-else", b"kept")
    cleared = http.post("/clear", json={"instance_id": "store-clear", "location": REMOTE}).json()
    assert (cleared["removed"], cleared["kept_pinned"]) == (6, 0)
    assert store.keys("*") == [b"someone-else"]
