"""A load's next round of chunks is read on a thread of its own while the current one is
written; on one core everything stays on the loading thread. Real threads."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import pytest
import torch

from lmc_connector.cache.chunk import Chunk
from lmc_connector.tokens import ChunkKey
from lmc_connector.v1 import read_ahead
from lmc_connector.v1.read_ahead import ReadAhead

KEYS = [ChunkKey(1), ChunkKey(2)]


class Store:
    """A read that records which thread ran it and can be held until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.release.set()
        self.threads: list[int] = []
        self.fail = False

    def read(self, keys: Sequence[ChunkKey]) -> list[Chunk]:
        self.threads.append(threading.get_ident())
        assert self.release.wait(timeout=10)
        if self.fail:
            raise OSError("the store went away")
        return [Chunk(1, kv=torch.full((1,), float(k))) for k in keys]


def test_the_next_round_is_read_on_another_thread_while_the_caller_goes_on() -> None:
    store = Store()
    store.release.clear()
    ahead = ReadAhead(store.read, overlap=True)
    ahead.start(KEYS)  # returns while the read waits
    assert not store.release.is_set()
    store.release.set()
    chunks = ahead.take()
    assert [float(c.kv) for c in chunks if c.kv is not None] == [1.0, 2.0]
    assert store.threads and store.threads[0] != threading.get_ident()
    ahead.close()


def test_on_one_core_the_read_happens_in_take_on_the_callers_thread() -> None:
    store = Store()
    ahead = ReadAhead(store.read, overlap=False)
    ahead.start(KEYS)
    assert store.threads == []
    assert len(ahead.take()) == 2
    assert store.threads == [threading.get_ident()]


def test_a_read_that_outlasts_the_timeout_is_a_miss(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(read_ahead, "READ_TIMEOUT_S", 0.2)
    store = Store()
    store.release.clear()
    ahead = ReadAhead(store.read, overlap=True)
    ahead.start(KEYS)
    assert ahead.take() == []
    store.release.set()
    ahead.close()


def test_an_abandoned_read_that_fails_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    store = Store()
    store.release.clear()
    store.fail = True
    ahead = ReadAhead(store.read, overlap=True)
    ahead.start(KEYS)
    while not store.threads:  # the read has begun: it cannot be cancelled any more
        threading.Event().wait(0.01)
    with caplog.at_level(logging.WARNING, logger=read_ahead.__name__):
        ahead.abandon()
        store.release.set()
        ahead.close()
        for _ in range(500):
            if "the store went away" in caplog.text:
                break
            threading.Event().wait(0.01)
    assert "reading cached chunks ahead failed: the store went away" in caplog.text


def test_a_read_not_begun_when_abandoned_never_runs() -> None:
    store = Store()
    store.release.clear()
    ahead = ReadAhead(store.read, overlap=True)
    ahead.start(KEYS[:1])  # occupies the reader thread
    while not store.threads:
        threading.Event().wait(0.01)
    ahead.abandon()
    ahead.start(KEYS[1:])  # queued behind it
    ahead.abandon()
    store.release.set()
    ahead.start(KEYS)
    assert len(ahead.take()) == 2
    assert len(store.threads) == 2  # the first read and the last, not the abandoned one
    ahead.close()
