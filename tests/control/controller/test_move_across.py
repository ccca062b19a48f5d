"""`/move` in LMCache's shape, across instances: the destination pulls the prefix from the
source rank for rank; without `should_copy` the source drops it once the destination holds
it. The within-instance shape keeps working. Real controller, in-process workers (TP=2),
per-rank KV, so crossed ranks would show.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch

from lmc_connector.launch import free_port
from lmc_connector.tokens import KeyScope, Prompt
from tests.control.agent.test_peers import CHUNKS, TOKENS, fill_per_rank, p2p, plain
from tests.control.conftest import InstanceFactory, new_controller
from tests.control.harness import CPU, DISK, Controller, Worker, registered, wait_until


@pytest.fixture(scope="module")
def peer_controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Controller]:
    ctl = new_controller(tmp_path_factory.mktemp("move"), "--reply-port", str(free_port()))
    ctl.start()
    yield ctl
    ctl.stop()


@pytest.fixture
def client(peer_controller: Controller) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=peer_controller.url, timeout=10) as http:
        yield http


def instance_id(workers: list[Worker]) -> str:
    return workers[0].engine.config.lmcache_instance_id


@pytest.fixture
def pair(
    make_instance: InstanceFactory, peer_controller: Controller, request: pytest.FixtureRequest
) -> tuple[list[Worker], list[Worker]]:
    name = request.node.name[:40]
    a = make_instance(f"A-{name}", target=peer_controller, disk=True, **p2p(peer_controller))
    b = make_instance(f"B-{name}", target=peer_controller, disk=True, **p2p(peer_controller))
    fill_per_rank(a, TOKENS)
    wait_until(lambda: registered(peer_controller.url, instance_id(a), 2, CHUNKS), what="A")
    return a, b


def move(client: httpx.Client, a: list[Worker], b: list[Worker], **extra: Any) -> httpx.Response:
    body = {
        "old_position": [instance_id(a), CPU],
        "new_position": [instance_id(b), CPU],
        "tokens": TOKENS,
        **extra,
    }
    return client.post("/move", json=body)


def finished(client: httpx.Client, event_id: str) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        event: dict[str, Any] = client.get(f"/events/{event_id}").json()
        return event if event["status"] in ("finished", "failed") else None

    return wait_until(ended, what=f"event {event_id}")


@pytest.mark.parametrize("should_copy", [True, False])
def test_move_across_instances_pulls_rank_for_rank(
    pair: tuple[list[Worker], list[Worker]], client: httpx.Client, should_copy: bool
) -> None:
    a, b = pair
    expected = [plain(w, TOKENS) for w in a]
    answer = move(client, a, b, should_copy=should_copy)
    assert answer.status_code == 200, answer.text
    assert answer.json()["num_tokens"] == len(TOKENS)
    event = finished(client, answer.json()["event_id"])
    assert event["status"] == "finished", event
    assert event["kind"] == "move"
    assert [w["chunks_done"] for w in event["workers"]] == [CHUNKS, CHUNKS]
    for rank in (0, 1):
        got = plain(b[rank], TOKENS)
        assert all(torch.equal(x, y) for x, y in zip(got, expected[rank], strict=True))
        assert not any(torch.equal(x, y) for x, y in zip(got, expected[1 - rank], strict=True))
        assert a[rank].engine.lookup(TOKENS) == (len(TOKENS) if should_copy else 0)


def test_a_salted_prompt_moves_under_its_salt_and_the_plain_one_stays(
    pair: tuple[list[Worker], list[Worker]], client: httpx.Client
) -> None:
    a, b = pair
    salted = Prompt(TOKENS, KeyScope(cache_salt="tenant-a"))
    for worker in a:
        worker.fill(salted, seed=200 + worker.engine.layout.rank, scope=salted.scope)
    expected = [plain(w, salted) for w in a]

    def indexed() -> bool:
        body = {"tokens": TOKENS, "cache_salt": "tenant-a"}
        return bool(client.post("/lookup", json=body).json()["layout_info"])

    wait_until(indexed, what="the salted prompt in the index")
    answer = move(client, a, b, cache_salt="tenant-a")
    assert answer.status_code == 200, answer.text
    assert answer.json()["num_tokens"] == len(TOKENS)
    assert finished(client, answer.json()["event_id"])["status"] == "finished"
    for rank in (0, 1):
        got = plain(b[rank], salted)
        assert len(got) == CHUNKS
        assert all(torch.equal(x, y) for x, y in zip(got, expected[rank], strict=True))
        assert b[rank].engine.lookup(TOKENS) == 0
        assert a[rank].engine.lookup(salted) == 0
        assert a[rank].engine.lookup(TOKENS) == len(TOKENS)


def test_lookup_shows_both_instances_after_a_copy(
    pair: tuple[list[Worker], list[Worker]], client: httpx.Client
) -> None:
    a, b = pair
    finished(client, move(client, a, b, copy=True).json()["event_id"])

    def both() -> dict[str, Any] | None:
        layout: dict[str, Any] = client.post("/lookup", json={"tokens": TOKENS}).json()
        return layout["layout_info"] if len(layout["layout_info"]) >= 2 else None

    layout = wait_until(both, what="both instances in /lookup")
    assert layout[instance_id(a)] == [CPU, len(TOKENS)]
    assert layout[instance_id(b)] == [CPU, len(TOKENS)]


def test_move_into_another_location_of_the_destination(
    pair: tuple[list[Worker], list[Worker]], client: httpx.Client
) -> None:
    a, b = pair
    body = {"new_position": [instance_id(b), DISK], "should_copy": True}
    answer = move(client, a, b, **body)
    assert finished(client, answer.json()["event_id"])["status"] == "finished"
    assert all(w.engine.lookup(TOKENS, [DISK]) == len(TOKENS) for w in b)
    assert all(w.engine.lookup(TOKENS, [CPU]) == 0 for w in b)


def test_within_instance_shape_still_moves_between_locations(
    pair: tuple[list[Worker], list[Worker]], client: httpx.Client
) -> None:
    a, _ = pair
    body = {"instance_id": instance_id(a), "source": CPU, "destination": DISK, "tokens": TOKENS}
    answer = client.post("/move", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["num_tokens"] == len(TOKENS)
    assert all(w.engine.lookup(TOKENS, [DISK]) == len(TOKENS) for w in a)


def test_move_between_different_layouts_is_refused_naming_why(
    pair: tuple[list[Worker], list[Worker]],
    make_instance: InstanceFactory,
    peer_controller: Controller,
    client: httpx.Client,
) -> None:
    a, _ = pair
    other = make_instance(
        "move-other", chunk_size=2, target=peer_controller, **p2p(peer_controller)
    )
    answer = move(client, a, other)
    assert answer.status_code == 400
    assert "different KV layouts" in answer.json()["detail"]


def test_move_from_an_instance_without_peers_is_refused_naming_the_key(
    make_instance: InstanceFactory, peer_controller: Controller, client: httpx.Client
) -> None:
    a = make_instance("move-no-p2p-a", target=peer_controller)
    b = make_instance("move-no-p2p-b", target=peer_controller, **p2p(peer_controller))
    answer = move(client, a, b)
    assert answer.status_code == 400
    assert "enable_p2p" in answer.json()["detail"]


@pytest.mark.parametrize(
    "body",
    [
        {"tokens": [1], "old_position": ["a", CPU]},
        {"tokens": [1], "instance_id": "a", "source": CPU},
        {"tokens": [1], "instance_id": "a", "source": CPU, "destination": DISK,
         "old_position": ["a", CPU], "new_position": ["b", CPU]},
    ],
)  # fmt: skip
def test_a_mixed_or_partial_move_body_names_both_shapes(
    client: httpx.Client, body: dict[str, Any]
) -> None:
    answer = client.post("/move", json=body)
    assert answer.status_code == 400
    assert "old_position and new_position" in answer.json()["detail"]


def test_a_move_whose_source_dies_fails_and_says_how_far_it_got(
    pair: tuple[list[Worker], list[Worker]], client: httpx.Client
) -> None:
    a, b = pair
    for worker in a:
        assert worker.agent.peer_server is not None
        worker.agent.peer_server.close()  # the source stops serving; it still heartbeats
    event = finished(client, move(client, a, b, should_copy=True).json()["event_id"])
    assert event["status"] == "failed"
    assert "stopped after 0 chunks" in event["error"]
    assert all(w.engine.lookup(TOKENS) == len(TOKENS) for w in a)


def test_kvtc_chunks_pulled_by_an_instance_without_their_calibration_are_misses(
    pair: tuple[list[Worker], list[Worker]], client: httpx.Client
) -> None:
    a, b = pair

    def ran(answer: httpx.Response) -> None:
        assert finished(client, answer.json()["event_id"])["status"] == "finished"

    ran(client.post("/calibrate", json={"instance_id": instance_id(a)}))
    body = {"instance_id": instance_id(a), "method": "kvtc", "location": CPU, "tokens": TOKENS}
    ran(client.post("/compress", json=body))
    ran(move(client, a, b, should_copy=True))
    for worker in b:  # the chunks travelled as stored; B has no shared store to find A's fit
        keys = worker.engine.hashes(TOKENS)
        assert [c.method for c in worker.engine.stored(keys)] == ["kvtc"] * CHUNKS
        assert worker.engine.get(keys) == []
        assert worker.engine.lookup(TOKENS) == 0  # the first chunk made way for recomputed KV
    assert all(len(w.engine.get(w.engine.hashes(TOKENS))) == CHUNKS for w in a)
