"""Decoding spreads over every CPU the process may use, even from a thread bound to one core.

vLLM's CPU worker binds its model-runner thread, which loads cached chunks, to one core,
and a thread inherits the mask of the thread that starts it: the codecs' threads, started
from there, would all queue on that core. Real threads, real CPU masks, the real codec.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TypeVar

import pytest
import torch

from lmc_connector.affinity import process_cpus
from lmc_connector.ops.codecs import fit_calibration, get_codec, threads
from tests.ops.kv_builders import attention_like

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux CPU masks and at least two CPUs",
)
T = TypeVar("T")


def _on_one_core(fn: Callable[[], T]) -> T:
    """fn() on a new thread bound to one CPU, as vLLM's model-runner thread is."""
    result: list[T] = []

    def bound() -> None:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        result.append(fn())

    thread = threading.Thread(target=bound)
    thread.start()
    thread.join(timeout=60)
    assert result, "the bound thread did not finish"
    return result[0]


def test_a_decode_from_a_thread_bound_to_one_core_runs_on_every_cpu_at_once() -> None:
    workers = min(len(process_cpus()), threads.POOL_SIZE)
    together = threading.Barrier(workers, timeout=10)  # broken unless all run at once

    def task(_: int) -> tuple[int, frozenset[int]]:
        together.wait()
        return threading.get_native_id(), frozenset(os.sched_getaffinity(0))

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as in vLLM's worker whose forward has one core
    try:
        ran = _on_one_core(lambda: threads.parallel(task, workers, threads.decode_threads()))
    finally:
        torch.set_num_threads(before)
    assert len({native_id for native_id, _ in ran}) == workers
    assert {mask for _, mask in ran} == {frozenset(process_cpus())}


def test_encoding_keeps_to_torch_threads() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        caller = threading.get_native_id()
        ran = threads.parallel(lambda _: threading.get_native_id(), 4, threads.encode_threads())
    finally:
        torch.set_num_threads(before)
    assert ran == [caller] * 4


@pytest.mark.parametrize("method", ["cachegen", "kvtc"])
def test_chunks_decoded_over_many_threads_equal_those_decoded_on_one(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunks = attention_like((2, 4, 64, 32), 6, seed=3)
    params = {"calibration": fit_calibration(method, chunks)} if method == "kvtc" else {}
    codec = get_codec(method, **params)
    blobs = [codec.encode(c) for c in chunks]

    spread = _on_one_core(lambda: codec.decode_batch(blobs))
    monkeypatch.setattr(threads, "decode_threads", lambda: 1)
    alone = codec.decode_batch(blobs)
    for a, b in zip(spread, alone, strict=True):
        assert torch.equal(a, b)
