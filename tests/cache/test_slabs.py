"""The bytes of encoded chunks are cut from the buffer pool's touched memory (slabs)."""

import resource

import torch

from lmc_connector.cache.chunk import Chunk
from lmc_connector.cache.pool import BufferPool
from lmc_connector.cache.slabs import ALIGN

SHAPE = (2, 2, 64, 64)  # 32 KiB of float16
BUFFER_BYTES = 2 * 2 * 64 * 64 * 2


def prefilled(buffers: int) -> BufferPool:
    pool = BufferPool(max_bytes=buffers * BUFFER_BYTES)
    assert pool.prefill(SHAPE, torch.float16) == buffers
    return pool


def cut(pool: BufferPool, nbytes: int) -> torch.Tensor:
    return pool.take((nbytes,), torch.uint8)


def within(inner: torch.Tensor, outer_ptr: int, outer_bytes: int) -> bool:
    return outer_ptr <= inner.data_ptr() and inner.data_ptr() + inner.nbytes <= (
        outer_ptr + outer_bytes
    )


def test_consecutive_aligned_ranges_are_cut_from_one_free_buffer() -> None:
    pool = prefilled(1)
    ranges = [cut(pool, 5000) for _ in range(3)]
    start = ranges[0].data_ptr()
    assert [r.data_ptr() - start for r in ranges] == [0, 5056, 10112]  # 5000 up to ALIGN
    assert all(r.data_ptr() % ALIGN == 0 and r.nbytes == 5000 for r in ranges)
    assert all(r.dtype == torch.uint8 and r.is_contiguous() for r in ranges)
    assert pool.pooled_bytes == 0  # the buffer is a slab now


def test_ranges_are_written_without_first_touch_page_faults() -> None:
    shape = (2, 2, 256, 2048)  # 4 MiB of float16
    pool = BufferPool(max_bytes=4 << 20)
    assert pool.prefill(shape, torch.float16) == 1
    ranges = [cut(pool, 1 << 20) for _ in range(3)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for r in ranges:
        r.fill_(7)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 64


def test_bytes_that_fit_no_free_buffer_are_fresh_memory() -> None:
    pool = prefilled(1)
    big = cut(pool, BUFFER_BYTES + 1)
    assert big.nbytes == BUFFER_BYTES + 1
    assert pool.pooled_bytes == BUFFER_BYTES  # the buffer stayed free


def test_a_slab_is_free_again_once_no_range_of_it_is_alive() -> None:
    pool = prefilled(2)
    first = cut(pool, BUFFER_BYTES - 100)
    slab_start = first.data_ptr()
    second = cut(pool, BUFFER_BYTES - 100)  # no room left in the first slab: the other buffer
    assert not within(second, slab_start, BUFFER_BYTES)
    third = cut(pool, 1000)  # both slabs taken, the first still seen: fresh memory
    assert not within(third, slab_start, BUFFER_BYTES)
    del first
    fourth = cut(pool, BUFFER_BYTES - 100)  # the first slab is cut anew
    assert fourth.data_ptr() == slab_start


def test_a_blob_viewing_a_range_keeps_its_slab_from_being_cut_again() -> None:
    """Chunk blobs read back from a store are read-only views of their range (numpy's view
    of the tensor): as long as a chunk holds one, its bytes are never handed out again."""
    pool = prefilled(1)
    rng = cut(pool, BUFFER_BYTES - 100)
    rng.fill_(9)
    chunk = Chunk(64, blob=rng.numpy().data.toreadonly(), method="fp8")
    slab_start = rng.data_ptr()
    del rng
    other = cut(pool, BUFFER_BYTES - 100)
    assert other.data_ptr() != slab_start
    assert chunk.blob is not None and bytes(chunk.blob) == b"\x09" * (BUFFER_BYTES - 100)
    del chunk, other
    assert cut(pool, BUFFER_BYTES - 100).data_ptr() == slab_start


def test_a_slab_nobody_sees_goes_back_as_a_buffer_for_plain_chunks() -> None:
    pool = prefilled(1)
    rng = cut(pool, BUFFER_BYTES)
    slab_start = rng.data_ptr()
    del rng
    cut(pool, BUFFER_BYTES + 1)  # needs a new slab: the full one, unseen, is given back
    assert pool.pooled_bytes == BUFFER_BYTES
    assert pool.take(SHAPE, torch.float16).data_ptr() == slab_start


def test_slabs_held_stay_within_the_pools_budget() -> None:
    pool = prefilled(2)
    held = [cut(pool, BUFFER_BYTES), cut(pool, BUFFER_BYTES)]
    for _ in range(2):  # the pool fills up again with removed chunks' buffers
        removed = Chunk(64, kv=torch.zeros(SHAPE, dtype=torch.float16))
        recycled = pool.recycle(removed)
        assert recycled
    assert pool.pooled_bytes == 2 * BUFFER_BYTES
    fresh = cut(pool, BUFFER_BYTES)
    assert pool.pooled_bytes == 2 * BUFFER_BYTES  # two slabs are held already: not a third
    assert all(not within(fresh, h.data_ptr(), h.nbytes) for h in held)
