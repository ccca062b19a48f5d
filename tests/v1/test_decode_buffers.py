"""The load path's decode buffers: a few chunks' memory, handed out in turn."""

from __future__ import annotations

import pytest
import torch

from lmc_connector.v1.decode_buffers import DecodeBuffers

CHUNK = (2, 3, 8, 4)


def test_buffers_are_handed_out_in_turn_and_reused_after_count() -> None:
    take = DecodeBuffers(CHUNK, torch.float32, count=3)
    first = [take(CHUNK, torch.float32).data_ptr() for _ in range(3)]
    assert len(set(first)) == 3
    assert [take(CHUNK, torch.float32).data_ptr() for _ in range(3)] == first


def test_a_partial_chunk_is_a_contiguous_start_of_a_buffer() -> None:
    take = DecodeBuffers(CHUNK, torch.float16, count=1)
    full = take(CHUNK, torch.float16)
    part = take((2, 3, 5, 4), torch.float16)
    assert part.shape == (2, 3, 5, 4) and part.is_contiguous()
    assert part.data_ptr() == full.data_ptr()


@pytest.mark.parametrize(
    ("shape", "dtype"), [((2, 3, 9, 4), torch.float32), (CHUNK, torch.float16)], ids=str
)
def test_another_layout_gets_memory_of_its_own(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    take = DecodeBuffers(CHUNK, torch.float32, count=1)
    mine = take(CHUNK, torch.float32)
    other = take(shape, dtype)
    assert other.shape == shape and other.dtype == dtype
    assert other.untyped_storage().data_ptr() != mine.untyped_storage().data_ptr()


def test_count_must_be_positive() -> None:
    with pytest.raises(ValueError, match="count must be positive"):
        DecodeBuffers(CHUNK, torch.float32, count=0)
