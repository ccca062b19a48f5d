import resource

import pytest
import torch

from lmc_connector.cache import pool as pool_module
from lmc_connector.cache.chunk import Chunk
from lmc_connector.cache.pool import BufferPool
from lmc_connector.cache.record import payload

SHAPE = (2, 2, 4, 8)


def removed_chunk() -> Chunk:
    return Chunk(4, kv=torch.ones(SHAPE, dtype=torch.float16))


def pool_in_use(max_bytes: int) -> BufferPool:
    """A pool that puts draw their buffers from."""
    pool = BufferPool(max_bytes)
    pool.take(SHAPE, torch.float16)
    return pool


def test_pool_nobody_draws_from_keeps_nothing() -> None:
    pool = BufferPool(max_bytes=1 << 20)
    assert not pool.recycle(removed_chunk())
    assert pool.pooled_bytes == 0


def test_buffer_of_an_unreferenced_chunk_is_reused() -> None:
    pool = pool_in_use(max_bytes=1 << 20)
    chunk = removed_chunk()
    storage = chunk.kv.data_ptr()  # type: ignore[union-attr]
    assert pool.recycle(chunk)
    del chunk
    assert pool.take(SHAPE, torch.float16).data_ptr() == storage


def test_an_interpreter_that_counts_references_otherwise_never_recycles(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pool_module, "_REFCOUNTS_AS_ASSUMED", False)
    assert not pool_in_use(max_bytes=1 << 20).recycle(removed_chunk())


def test_buffer_once_read_through_numpy_is_reused() -> None:
    """What an upload to the store or a write to disk does to a chunk (torch then marks
    the storage as not resizable) does not keep its buffer from being reused."""
    pool = pool_in_use(max_bytes=1 << 20)
    chunk = removed_chunk()
    assert chunk.kv is not None
    # numpy declares ndarray.__buffer__ only for Python >= 3.12 (stubs); the buffer exists on 3.11.
    bytes(memoryview(chunk.kv.view(torch.uint8).numpy()))  # type: ignore[arg-type]
    storage = chunk.kv.data_ptr()
    assert pool.recycle(chunk)
    del chunk
    assert pool.take(SHAPE, torch.float16).data_ptr() == storage


def test_buffer_an_upload_still_reads_is_not_reused() -> None:
    pool = pool_in_use(max_bytes=1 << 20)
    chunk = removed_chunk()
    pieces = payload(chunk)  # what the store writer holds until the value is written
    assert not pool.recycle(chunk)
    assert pieces.nbytes == chunk.nbytes


def test_borrowed_memory_is_never_reused() -> None:
    pool = pool_in_use(max_bytes=1 << 20)
    data = bytearray(removed_chunk().nbytes)
    kv = torch.frombuffer(data, dtype=torch.float16).view(SHAPE)
    assert not pool.recycle(Chunk(4, kv=kv, borrowed=True))
    assert pool.pooled_bytes == 0


def test_buffer_still_held_by_a_reader_is_not_reused() -> None:
    pool = pool_in_use(max_bytes=1 << 20)
    chunk = removed_chunk()
    reader_copy = chunk.kv
    assert not pool.recycle(chunk)
    assert reader_copy is not None


def test_buffer_with_a_live_view_is_not_reused() -> None:
    pool = BufferPool(max_bytes=1 << 20)
    chunk = removed_chunk()
    assert chunk.kv is not None
    view = chunk.kv[0]
    assert not pool.recycle(chunk)
    assert view.shape == SHAPE[1:]


def test_chunk_object_held_elsewhere_is_not_reused() -> None:
    pool = BufferPool(max_bytes=1 << 20)
    chunk = removed_chunk()
    holders = [chunk]
    assert not pool.recycle(chunk)
    assert holders


def test_pool_keeps_at_most_its_byte_budget() -> None:
    one = removed_chunk()
    pool = pool_in_use(max_bytes=one.nbytes)
    assert pool.recycle(one)
    assert not pool.recycle(removed_chunk())
    assert pool.pooled_bytes == one.nbytes


def test_prefill_adds_buffers_up_to_the_pools_bound() -> None:
    buffer_bytes = torch.empty(SHAPE, dtype=torch.float16).nbytes
    pool = BufferPool(max_bytes=3 * buffer_bytes + buffer_bytes // 2)
    assert pool.prefill(SHAPE, torch.float16) == 3
    assert pool.pooled_bytes == 3 * buffer_bytes
    assert pool.prefill(SHAPE, torch.float16) == 0


def test_prefilled_buffers_are_taken_before_new_memory() -> None:
    pool = BufferPool(max_bytes=1 << 20)
    pool.prefill(SHAPE, torch.float16)
    taken = [pool.take(SHAPE, torch.float16) for _ in range(pool.pooled_bytes // 128)]
    assert pool.pooled_bytes == 0
    assert len({t.data_ptr() for t in taken}) == len(taken)
    assert all(t.shape == SHAPE for t in taken)


def test_prefilled_memory_is_written_without_first_touch_page_faults() -> None:
    """The point of prefilling: the kernel maps a buffer's pages before the first chunk
    lands in it (a 4 MiB buffer written fresh takes about a thousand faults)."""
    shape = (2, 2, 256, 2048)  # 4 MiB of float16
    pool = BufferPool(max_bytes=4 << 20)
    assert pool.prefill(shape, torch.float16) == 1
    kv = pool.take(shape, torch.float16)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    kv.fill_(1.0)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 64
