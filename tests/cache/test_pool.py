import torch

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


def test_buffer_once_read_through_numpy_is_reused() -> None:
    """What an upload to the store or a write to disk does to a chunk (torch then marks
    the storage as not resizable) does not keep its buffer from being reused."""
    pool = pool_in_use(max_bytes=1 << 20)
    chunk = removed_chunk()
    assert chunk.kv is not None
    bytes(memoryview(chunk.kv.view(torch.uint8).numpy()))
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
