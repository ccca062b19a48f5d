"""Gather/scatter between paged KV views and chunk tensors, for each KV format."""

from __future__ import annotations

import pytest
import torch

from lmc_connector.ops import paged
from lmc_connector.ops.paged import KVFormat

BLOCKS, HEADS, BLOCK, HEAD = 16, 2, 8, 4


def make_layer(fmt: KVFormat, seed: int) -> torch.Tensor:
    """A `[blocks, heads, block, C]` view like vLLM's: a strided slice of a bigger buffer."""
    width = HEAD if fmt is KVFormat.MLA else 2 * HEAD
    heads = 1 if fmt is KVFormat.MLA else HEADS
    gen = torch.Generator().manual_seed(seed)
    buffer = torch.randn(2, BLOCKS, heads, BLOCK, width, generator=gen)
    return buffer[1]  # a view with a storage offset, as in a cross-layer buffer


@pytest.mark.parametrize("fmt", list(KVFormat))
def test_round_trip_restores_the_tokens(fmt: KVFormat) -> None:
    layers = [paged.plane_views(make_layer(fmt, s), fmt) for s in range(3)]
    table = [5, 2, 11, 7]
    blocks, offsets = paged.token_slots(table, 3, 29, BLOCK, BLOCK, "cpu")
    chunk = paged.gather(layers, blocks, offsets)
    assert chunk.shape == (fmt.planes, 3, 26, layers[0][0].shape[1] * HEAD)

    targets = [paged.plane_views(make_layer(fmt, 10 + s), fmt) for s in range(3)]
    other = [10, 0, 3, 8]
    dst_blocks, dst_offsets = paged.token_slots(other, 3, 29, BLOCK, BLOCK, "cpu")
    paged.scatter(targets, dst_blocks, dst_offsets, chunk)
    assert torch.equal(paged.gather(targets, dst_blocks, dst_offsets), chunk)


def test_scatter_writes_the_underlying_cache_and_nothing_else() -> None:
    kv = make_layer(KVFormat.PACKED, 0)
    before = kv.clone()
    planes = paged.plane_views(kv, KVFormat.PACKED)
    blocks, offsets = paged.token_slots([3], 0, 2, BLOCK, BLOCK, "cpu")
    paged.scatter([planes], blocks, offsets, torch.zeros(2, 1, 2, HEADS * HEAD))
    assert torch.count_nonzero(kv[3, :, :2]) == 0
    kv[3, :, :2] = before[3, :, :2]
    assert torch.equal(kv, before)


def test_cpu_pages_are_k_rows_then_v_rows() -> None:
    kv = make_layer(KVFormat.CPU_PAGED, 0)
    k, v = paged.plane_views(kv, KVFormat.CPU_PAGED)
    page = kv[4, 1].reshape(2 * BLOCK, HEAD)
    assert torch.equal(k[4, 1], page[:BLOCK]) and torch.equal(v[4, 1], page[BLOCK:])


def test_packed_tokens_hold_k_then_v() -> None:
    kv = make_layer(KVFormat.PACKED, 0)
    k, v = paged.plane_views(kv, KVFormat.PACKED)
    assert torch.equal(k[2, 0, 5], kv[2, 0, 5, :HEAD]) and torch.equal(
        v[2, 0, 5], kv[2, 0, 5, HEAD:]
    )


def test_kernel_blocks_smaller_than_scheduler_blocks() -> None:
    blocks, offsets = paged.token_slots([3], 0, 8, 8, 4, "cpu")
    assert blocks.tolist() == [6] * 4 + [7] * 4 and offsets.tolist() == [0, 1, 2, 3] * 2


def test_too_few_blocks_is_an_error() -> None:
    with pytest.raises(ValueError, match="need 2 blocks"):
        paged.token_slots([1], 0, BLOCK + 1, BLOCK, BLOCK, "cpu")


def test_whole_block_copies_match_the_row_views() -> None:
    kvs = [make_layer(KVFormat.CPU_PAGED, s) for s in range(2)]
    planes = [paged.plane_views(kv, KVFormat.CPU_PAGED) for kv in kvs]
    table = [6, 1, 9]
    blocks, offsets = paged.token_slots(table, 0, 3 * BLOCK, BLOCK, BLOCK, "cpu")
    chunk = paged.gather_blocks(kvs, blocks[::BLOCK])
    assert torch.equal(chunk, paged.gather(planes, blocks, offsets))

    targets = [make_layer(KVFormat.CPU_PAGED, 10 + s) for s in range(2)]
    paged.scatter_blocks(targets, torch.tensor([2, 4, 0]), chunk)
    for src, dst in zip(kvs, targets, strict=True):
        assert torch.equal(dst[[2, 4, 0]], src[table])
