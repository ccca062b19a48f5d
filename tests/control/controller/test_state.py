"""Controller state as pure logic: registration, chunk index, liveness, operations."""

from __future__ import annotations

import pytest

from lmc_connector import tokens as tok
from lmc_connector.control.controller import state
from lmc_connector.control.controller.index import LOCATION_SLOTS, ChunkIndex
from lmc_connector.control.controller.operations import OperationStore
from lmc_connector.control.controller.state import ControllerState as Controller
from lmc_connector.control.controller.state import Notice
from lmc_connector.control.wire import commands as cmd
from lmc_connector.control.wire import monitor as m
from lmc_connector.operations import JobOutcome
from lmc_connector.tokens import ChunkKey

CPU, DISK = "LocalCPUBackend", "LocalDiskBackend"
PROMPT = list(range(40))  # 10 chunks of 4


def register(
    c: Controller,
    rank: int,
    session: str = "s",
    instance: str = "i",
    now: float = 0.0,
    world_size: int = 2,
    port: int | None = None,
    chunk_size: int = 4,
) -> Notice | None:
    return c.handle(
        m.Register(
            instance,
            rank,
            world_size,
            f"{session}{rank}",
            "127.0.0.1",
            8000 + rank if port is None else port,
            "m",
            chunk_size,
            [CPU, DISK],
            ["cachegen"],
        ),
        now,
    )


def admit(
    c: Controller,
    rank: int,
    keys: list[ChunkKey],
    location: str = CPU,
    now: float = 0.0,
    session: str = "s",
) -> None:
    c.handle(m.ChunkEvents("i", rank, f"{session}{rank}", [m.ChunkOp(True, location, keys)]), now)


def test_lookup_needs_every_rank_in_the_same_location() -> None:
    c = Controller()
    register(c, 0)
    register(c, 1)
    keys = tok.chunk_hashes(PROMPT, 4)
    admit(c, 0, keys)
    admit(c, 1, keys[:6])
    admit(c, 1, keys[6:], DISK)
    assert c.lookup(PROMPT) == {"i": (CPU, 24)}


def test_evicted_chunks_shorten_the_prefix() -> None:
    c = Controller()
    register(c, 0)
    register(c, 1)
    keys = tok.chunk_hashes(PROMPT, 4)
    for rank in (0, 1):
        admit(c, rank, keys)
    c.handle(m.ChunkEvents("i", 0, "s0", [m.ChunkOp(False, CPU, [keys[3]])]), 0.0)
    assert c.lookup(PROMPT) == {"i": (CPU, 12)}


def test_silent_worker_is_dropped_with_its_chunks_and_its_events_fail() -> None:
    c = Controller(worker_timeout=5)
    register(c, 0)
    register(c, 1)
    admit(c, 0, tok.chunk_hashes(PROMPT, 4))
    event = c.operations.create("compress", "i", [0, 1])
    c.operations.start(event)
    c.handle(m.Heartbeat("i", 1, "s1", "127.0.0.1", 8001), 4.0)
    gone = c.expire(6.0)
    assert [(g.rank, g.address) for g in gone] == [(0, "tcp://127.0.0.1:8000")]
    assert c.index.size("i") == 0
    assert event.status == "failed" and "no heartbeat" in str(event.error)


def test_heartbeat_from_an_unknown_worker_asks_for_a_resync_once_per_interval() -> None:
    c = Controller()
    beat = m.Heartbeat("i", 0, "new", "127.0.0.1", 8000)
    first = c.handle(beat, 10.0)
    assert first is not None and first[0].address == "tcp://127.0.0.1:8000"
    assert isinstance(first[1], cmd.Resync)
    assert c.handle(beat, 10.1) is None
    assert c.handle(beat, 12.0) is not None


def test_snapshot_replaces_what_the_worker_had() -> None:
    c = Controller()
    register(c, 0)
    admit(c, 0, [ChunkKey(1), ChunkKey(2), ChunkKey(3)])
    c.handle(m.Snapshot("i", 0, "s0", {CPU: [ChunkKey(3), ChunkKey(4)]}), 0.0)
    assert c.index.count("i", 0, CPU) == 2 and c.index.size("i") == 2


def test_reregistration_after_a_restart_forgets_the_previous_life() -> None:
    c = Controller(worker_timeout=5)
    register(c, 0)
    register(c, 1)
    admit(c, 0, [ChunkKey(1), ChunkKey(2), ChunkKey(3)])
    c.handle(m.Heartbeat("i", 1, "s1", "127.0.0.1", 8001), 6.0)
    register(c, 0, session="restarted", now=6.0)  # the old life is silent for 6 s
    assert c.instances["i"].workers[0].spec.session == "restarted0"
    assert c.index.size("i") == 0
    admit(c, 0, [ChunkKey(9)], now=6.0)  # a late batch of the old session
    assert c.index.size("i") == 0


def test_a_live_worker_is_not_replaced_by_a_registration_of_another_session() -> None:
    c = Controller(worker_timeout=5)
    register(c, 0)
    admit(c, 0, [ChunkKey(1), ChunkKey(2), ChunkKey(3)])
    register(c, 0, session="forged", now=1.0)
    assert c.instances["i"].workers[0].spec.session == "s0"
    assert c.index.size("i") == 3 and c.stats.refused == 1


def test_a_newcomer_cannot_rewrite_the_world_size_or_chunk_size() -> None:
    c = Controller()
    register(c, 0)
    register(c, 1, world_size=4)
    register(c, 1, chunk_size=8)
    instance = c.instances["i"]
    assert (instance.world_size, instance.chunk_size, list(instance.workers)) == (2, 4, [0])
    assert c.stats.refused == 2


def test_a_job_done_of_another_session_is_ignored() -> None:
    c = Controller()
    register(c, 0, world_size=1)
    event = c.operations.create("compress", "i", [0])
    c.operations.start(event)
    forged = JobOutcome(bytes_after=10**12)
    c.handle(m.JobDone("i", 0, "forged", event.event_id, forged), 0.0)
    assert event.status == "running" and c.stats.ignored == 1


def test_job_completions_finish_the_event_per_worker() -> None:
    c = Controller()
    register(c, 0)
    register(c, 1)
    event = c.operations.create("compress", "i", [0, 1])
    c.operations.start(event)
    c.handle(m.JobDone("i", 0, "s0", event.event_id, JobOutcome(chunks_done=2)), 0.0)
    assert event.status == "running"
    c.handle(m.JobDone("i", 1, "s1", event.event_id, JobOutcome(errors=["disk full"])), 0.0)
    assert event.status == "failed" and "worker 1: disk full" in str(event.error)


def test_ended_operations_are_forgotten_oldest_first() -> None:
    store = OperationStore(max_ended=2)
    events = [store.create("clear", "i", []) for _ in range(3)]
    running = store.create("compress", "i", [0])
    store.start(running)
    for e in events:
        store.start(e)  # no parts: it ends at once
    assert store.find(events[0].event_id) is None
    assert store.find(events[2].event_id) is not None and store.find(running.event_id) is not None


def test_prefix_prefers_the_first_registered_location_on_a_tie() -> None:
    index = ChunkIndex()
    index.declare("i", [CPU, DISK])
    for location in (CPU, DISK):
        index.admit("i", 0, location, [ChunkKey(1), ChunkKey(2)])
    assert index.prefix("i", [ChunkKey(1), ChunkKey(2), ChunkKey(3)], [0]) == (CPU, 2)


def test_a_registration_sent_again_is_acknowledged_again_and_loses_nothing() -> None:
    c = Controller()
    register(c, 0, world_size=1)
    admit(c, 0, [ChunkKey(1), ChunkKey(2), ChunkKey(3)])
    running = c.operations.create("compress", "i", [0])
    c.operations.start(running)
    answer = register(c, 0, world_size=1)  # the same session: its answer was late or lost
    assert answer is not None and answer[1] == cmd.Registered("s0")
    assert running.status == "running" and c.index.count("i", 0, CPU) == 3
    c.handle(
        m.Snapshot("i", 0, "s0", {CPU: [ChunkKey(1), ChunkKey(2), ChunkKey(3), ChunkKey(4)]}), 0.0
    )  # sent after each Register
    assert c.instances["i"].workers[0].spec.session == "s0"
    assert c.index.count("i", 0, CPU) == 4


def test_lookups_store_no_event() -> None:
    c = Controller()
    register(c, 0)
    for _ in range(3):
        c.lookup(PROMPT)
    assert c.operations.counts() == {"pending": 0, "running": 0, "finished": 0, "failed": 0}
    assert c.stats.lookups == 3


def test_departed_workers_are_handed_over_once_unless_their_address_is_reused() -> None:
    c = Controller(worker_timeout=5)
    register(c, 0)
    register(c, 1)
    c.handle(m.Heartbeat("i", 1, "s1", "127.0.0.1", 8001), 6.0)
    register(c, 0, session="moved", port=9000, now=6.0)  # a new life at another address
    assert [r.address for r in c.take_departed()] == ["tcp://127.0.0.1:8000"]
    register(c, 0, session="again", port=9000, now=12.0)  # same address again: it stays
    c.handle(m.Deregister("i", 1, "s1"), 12.0)
    assert [r.address for r in c.take_departed()] == ["tcp://127.0.0.1:8001"]
    assert c.take_departed() == []
    c.expire(20.0)
    assert [r.address for r in c.take_departed()] == ["tcp://127.0.0.1:9000"]


def test_resync_requests_are_forgotten_once_their_retry_interval_passed() -> None:
    c = Controller()
    for session in range(100):
        c.handle(m.Heartbeat("i", 0, f"gone{session}", "127.0.0.1", 8000), 0.0)
    c.expire(5.0)
    assert c._resync_asked == {}


def test_operations_in_progress_are_capped_and_expire_without_a_scan() -> None:
    store = OperationStore(max_active=3, max_active_s=10.0)
    ops = [store.create("compress", "i", [0]) for _ in range(4)]
    assert ops[0].status == "failed" and "too many" in str(ops[0].error)
    for op in ops[1:]:
        store.start(op)
    assert store.expire(now=1e9) == 3
    assert all(op.status == "failed" and "expired" in str(op.error) for op in ops)


def test_one_instance_more_than_the_controller_tracks_is_refused_with_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(state, "MAX_INSTANCES", 2)
    c = Controller(worker_timeout=5)
    register(c, 0, instance="a")
    register(c, 0, instance="b")
    _, notice = register(c, 0, instance="c") or (None, None)
    assert isinstance(notice, cmd.RegistrationRefused)
    assert "tracks 2 instances already" in notice.reason and "--worker-timeout" in notice.reason
    assert "c" not in c.instances and "c" not in c.index
    register(c, 1, instance="a")  # a known instance still takes its workers
    assert list(c.instances["a"].workers) == [0, 1]


def test_a_new_instance_refused_for_its_locations_leaves_nothing_behind() -> None:
    c = Controller()
    too_many = [f"Tier{i}" for i in range(LOCATION_SLOTS + 1)]
    notice = c.handle(m.Register("many", 0, 1, "s0", "127.0.0.1", 8000, "m", 4, too_many, []), 0.0)
    assert notice is not None and isinstance(notice[1], cmd.RegistrationRefused)
    assert "many" not in c.instances and "many" not in c.index


def test_a_full_index_leaves_new_chunks_out_and_takes_them_once_evictions_make_room(
    caplog: pytest.LogCaptureFixture,
) -> None:
    c = Controller(max_indexed_chunks=3)
    register(c, 0)
    register(c, 1)
    with caplog.at_level("WARNING"):
        admit(c, 0, [ChunkKey(k) for k in (1, 2, 3, 4, 5)])
    assert c.index.size() == 3 and c.stats.unindexed == 2
    assert "--max-indexed-chunks" in caplog.text and "not indexed" in caplog.text
    admit(c, 1, [ChunkKey(1), ChunkKey(9)])  # another worker of a held hash needs no entry
    assert c.index.count("i", 1, CPU) == 1 and c.stats.unindexed == 3
    c.handle(m.ChunkEvents("i", 0, "s0", [m.ChunkOp(False, CPU, [ChunkKey(2)])]), 0.0)
    admit(c, 0, [ChunkKey(4)])
    assert c.index.count("i", 0, CPU) == 3 and c.index.size() == 3


def test_a_dropped_worker_or_instance_gives_its_index_entries_back() -> None:
    c = Controller(worker_timeout=5, max_indexed_chunks=4)
    register(c, 0, world_size=1)
    admit(c, 0, [ChunkKey(k) for k in (1, 2, 3, 4)])
    assert c.index.size() == 4
    c.expire(now=10.0)  # silent: dropped with its chunks, and its instance with it
    assert "i" not in c.instances and c.index.size() == 0
    register(c, 0, world_size=1, session="t", now=10.0)
    admit(c, 0, [ChunkKey(k) for k in (5, 6, 7, 8)], session="t", now=10.0)
    assert c.index.size() == 4 and c.stats.unindexed == 0
