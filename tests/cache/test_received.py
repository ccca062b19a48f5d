"""Chunks from bytes another process sent: a view without a copy, or a clear refusal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmc_connector.cache import ChunkLayout
from lmc_connector.cache.pool import BufferPool
from lmc_connector.cache.received import chunk_from_bytes

LAYOUT = ChunkLayout("m", 1, 0, "bfloat16", 2, 2, 8, 16)


def test_plain_bytes_become_a_view_of_the_received_buffer() -> None:
    kv = torch.randn(LAYOUT.shape(16)).to(torch.bfloat16)
    data = memoryview(kv.view(-1).view(torch.uint8).numpy().tobytes())
    chunk = chunk_from_bytes(LAYOUT, 16, data, None)
    assert chunk.kv is not None and torch.equal(chunk.kv, kv)
    assert chunk.kv.data_ptr() == torch.frombuffer(data, dtype=torch.uint8).data_ptr()


def test_a_received_buffer_is_never_recycled_for_writing() -> None:
    pool = BufferPool(2**20)
    pool.take((1,), torch.float32)  # a pool that is drawn from keeps what it may
    kv = torch.zeros(LAYOUT.shape(16), dtype=torch.bfloat16)
    chunk = chunk_from_bytes(
        LAYOUT, 16, memoryview(kv.view(-1).view(torch.uint8).numpy().tobytes()), None
    )
    assert pool.recycle(chunk) is False


@pytest.mark.parametrize(
    ("tokens", "nbytes", "method", "error"),
    [
        (17, 0, None, "does not fit chunk_size"),
        (16, 100, None, "are not a"),
        (4, 64, "cachegen", "damaged cachegen chunk"),
    ],
)
def test_bytes_that_are_not_a_chunk_of_the_layout_are_refused(
    tokens: int, nbytes: int, method: str | None, error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        chunk_from_bytes(LAYOUT, tokens, memoryview(bytes(nbytes)), method)


def test_a_blob_becomes_a_read_only_view_of_the_received_buffer() -> None:
    from lmc_connector.ops.codecs import get_codec

    blob = get_codec("fp8").encode(torch.randn(LAYOUT.shape(8)).to(torch.bfloat16))
    data = memoryview(bytearray(blob))
    chunk = chunk_from_bytes(LAYOUT, 8, data, "fp8")
    assert isinstance(chunk.blob, memoryview) and chunk.blob.readonly
    assert chunk.blob == blob
    assert (
        np.frombuffer(chunk.blob, np.uint8).ctypes.data == np.frombuffer(data, np.uint8).ctypes.data
    )


def test_a_blob_of_another_shape_is_refused() -> None:
    from lmc_connector.ops.codecs import get_codec

    blob = get_codec("fp8").encode(torch.randn(LAYOUT.shape(8)).to(torch.bfloat16))
    with pytest.raises(ValueError, match="is not a fp8 chunk of shape"):
        chunk_from_bytes(LAYOUT, 16, memoryview(blob), "fp8")
    assert chunk_from_bytes(LAYOUT, 8, memoryview(blob), "fp8").blob == blob
