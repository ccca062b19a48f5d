"""Decoding spreads over every CPU the process may use, even from a thread bound to one core.

vLLM's CPU worker binds its model-runner thread, which loads cached chunks, to one core,
and a thread inherits the mask of the thread that starts it: the codecs' threads, started
from there, would all queue on that core. Real threads, real CPU masks, the real codec.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest
import torch

from lmc_connector.affinity import process_cpus
from lmc_connector.ops.codecs import fit_calibration, get_codec, threads
from tests.one_core import on_one_core
from tests.ops.kv_builders import attention_like

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux CPU masks and at least two CPUs",
)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """torch at one thread, as in a vLLM worker whose forward has one core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_torch_thread")
def test_a_decode_from_a_thread_bound_to_one_core_runs_on_every_cpu_at_once() -> None:
    workers = min(len(process_cpus()), threads.POOL_SIZE)
    together = threading.Barrier(workers, timeout=10)  # broken unless all run at once

    def task(_: int) -> tuple[int, frozenset[int]]:
        together.wait()
        return threading.get_native_id(), frozenset(os.sched_getaffinity(0))

    def spread() -> tuple[int, list[tuple[int, frozenset[int]]]]:
        caller = threading.get_native_id()
        return caller, threads.parallel(task, workers, threads.decode_threads())

    caller, ran = on_one_core(spread)
    assert len({native_id for native_id, _ in ran}) == workers
    assert caller in {native_id for native_id, _ in ran}  # the caller does a share itself
    others = {mask for native_id, mask in ran if native_id != caller}
    assert others == {frozenset(process_cpus())}


@pytest.mark.usefixtures("one_torch_thread")
def test_encoding_keeps_to_torch_threads() -> None:
    caller = threading.get_native_id()
    ran = threads.parallel(lambda _: threading.get_native_id(), 4, threads.encode_threads())
    assert ran == [caller] * 4


@pytest.mark.parametrize("method", ["cachegen", "kvtc"])
def test_chunks_decoded_over_many_threads_equal_those_decoded_on_one(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunks = attention_like((2, 4, 64, 32), 6, seed=3)
    params = {"calibration": fit_calibration(method, chunks)} if method == "kvtc" else {}
    codec = get_codec(method, **params)
    blobs = [codec.encode(c) for c in chunks]

    spread = on_one_core(lambda: codec.decode_batch(blobs))
    monkeypatch.setattr(threads, "decode_threads", lambda: 1)
    alone = codec.decode_batch(blobs)
    for a, b in zip(spread, alone, strict=True):
        assert torch.equal(a, b)
