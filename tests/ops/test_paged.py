"""Copies between paged KV views and chunk tensors, for each KV format and vLLM-like layouts.

The fast copies (`PagedKV`) are checked against the per-plane reference in
`paged_reference.py`, on views built the way vLLM builds them: strided
slices of one buffer shared by every layer, in both token-major and
head-major physical orders.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from lmc_connector.ops import paged
from lmc_connector.ops.paged import KVFormat, PagedKV
from tests.ops.paged_reference import gather_rows

BLOCKS, HEADS, BLOCK, HEAD, LAYERS = 16, 2, 8, 4, 3


def make_layers(fmt: KVFormat, seed: int, token_major: bool = False) -> list[torch.Tensor]:
    """`[blocks, heads, block, C]` views into one cross-layer buffer, as vLLM registers them.

    `token_major` stores each block as [block, heads, C] (NHD) and permutes the view.
    """
    width = HEAD if fmt.planes == 1 else 2 * HEAD
    heads = 1 if fmt is KVFormat.MLA else HEADS
    gen = torch.Generator().manual_seed(seed)
    if token_major:
        buffer = torch.randn(BLOCKS, LAYERS, BLOCK, heads, width, generator=gen)
        return [buffer[:, i].permute(0, 2, 1, 3) for i in range(LAYERS)]
    buffer = torch.randn(BLOCKS, LAYERS, heads, BLOCK, width, generator=gen)
    return [buffer[:, i] for i in range(LAYERS)]


def reference(
    kvs: list[torch.Tensor], fmt: KVFormat, table: list[int], start: int, end: int
) -> tuple[list[list[torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
    planes = [paged.plane_views(kv, fmt) for kv in kvs]
    return planes, paged.token_slots(table, start, end, BLOCK, BLOCK, "cpu")


def span(fmt: KVFormat) -> tuple[int, int]:
    return (0, 4 * BLOCK) if fmt.whole_blocks else (3, 29)


#: Every format in both physical orders, but the CPU backend's pages, always head-major.
LAYOUTS = [(f, tm) for f in KVFormat for tm in (False, True) if not (f.whole_blocks and tm)]


@pytest.mark.parametrize(("fmt", "token_major"), LAYOUTS)
def test_read_equals_the_reference_gather(fmt: KVFormat, token_major: bool) -> None:
    kvs = make_layers(fmt, 0, token_major)
    table = [5, 2, 11, 7]
    start, end = span(fmt)
    got = PagedKV(kvs, fmt).read(table, start, end)
    planes, slots = reference(kvs, fmt, table, start, end)
    assert torch.equal(got, gather_rows(planes, *slots))


@pytest.mark.parametrize("fmt", list(KVFormat))
def test_write_then_read_round_trips_into_other_blocks(fmt: KVFormat) -> None:
    source = PagedKV(make_layers(fmt, 0), fmt)
    start, end = span(fmt)
    chunk = source.read([5, 2, 11, 7], start, end)
    target_kvs = make_layers(fmt, 1)
    before = [kv.clone() for kv in target_kvs]
    target = PagedKV(target_kvs, fmt)
    target.write([10, 0, 3, 8], start, chunk)
    assert torch.equal(target.read([10, 0, 3, 8], start, end), chunk)
    untouched = [b for b in range(BLOCKS) if b not in (10, 0, 3, 8)]
    for kv, old in zip(target_kvs, before, strict=True):
        assert torch.equal(kv[untouched], old[untouched])


def test_write_touches_only_the_given_tokens() -> None:
    kvs = make_layers(KVFormat.PACKED, 0)
    before = [kv.clone() for kv in kvs]
    pk = PagedKV(kvs, KVFormat.PACKED)
    pk.write([3], 0, torch.zeros(2, LAYERS, 2, HEADS * HEAD))
    for kv, old in zip(kvs, before, strict=True):
        assert torch.count_nonzero(kv[3, :, :2]) == 0
        kv[3, :, :2] = old[3, :, :2]
        assert torch.equal(kv, old)


def test_int8_and_fp8_caches_travel_as_bytes() -> None:
    gen = torch.Generator().manual_seed(0)
    raw = torch.randint(-128, 128, (BLOCKS, LAYERS, HEADS, BLOCK, 2 * HEAD), generator=gen)
    for dtype in (torch.int8, torch.float8_e4m3fn, torch.float8_e5m2):
        kvs = [raw.to(torch.int8).view(dtype)[:, i] for i in range(LAYERS)]
        pk = PagedKV(kvs, KVFormat.PACKED)
        chunk = pk.read([1, 4], 0, 12)
        assert chunk.dtype == torch.uint8
        planes, slots = reference(kvs, KVFormat.PACKED, [1, 4], 0, 12)
        want = gather_rows([[p.view(torch.uint8) for p in ps] for ps in planes], *slots)
        assert torch.equal(chunk, want)


def test_opaque_pages_move_whole_rows_of_bytes() -> None:
    """A packed quantized page (e.g. NVFP4: values and scales in one C) is never split."""
    kvs = [kv.view(torch.uint8) for kv in make_layers(KVFormat.OPAQUE, 0)]
    pk = PagedKV(kvs, KVFormat.OPAQUE)
    assert pk.planes == 1 and pk.channels == HEADS * kvs[0].shape[-1]
    chunk = pk.read([2, 9], 1, 15)
    target = PagedKV([kv.clone() for kv in kvs], KVFormat.OPAQUE)
    target.write([6, 3], 1, chunk)
    assert torch.equal(target.read([6, 3], 1, 15), chunk)


def test_cpu_pages_are_k_rows_then_v_rows() -> None:
    kv = make_layers(KVFormat.CPU_PAGED, 0)[0]
    k, v = paged.plane_views(kv, KVFormat.CPU_PAGED)
    page = kv[4, 1].reshape(2 * BLOCK, HEAD)
    assert torch.equal(k[4, 1], page[:BLOCK]) and torch.equal(v[4, 1], page[BLOCK:])


def test_whole_block_format_refuses_a_partial_block() -> None:
    pk = PagedKV(make_layers(KVFormat.CPU_PAGED, 0), KVFormat.CPU_PAGED)
    with pytest.raises(ValueError, match="block bounds"):
        pk.read([1, 2], 0, BLOCK + 3)


def test_kernel_blocks_smaller_than_scheduler_blocks() -> None:
    blocks, offsets = paged.token_slots([3], 0, 8, 8, 4, "cpu")
    assert blocks.tolist() == [6] * 4 + [7] * 4 and offsets.tolist() == [0, 1, 2, 3] * 2
    # Views in kernel blocks of BLOCK // 2 tokens; the scheduler counts blocks of BLOCK.
    kernel = BLOCK // 2
    buffer = torch.randn(2 * BLOCKS, LAYERS, HEADS, kernel, 2 * HEAD)
    kvs = [buffer[:, i] for i in range(LAYERS)]
    got = PagedKV(kvs, KVFormat.PACKED, block_size=BLOCK).read([3, 6], 2, 14)
    planes = [paged.plane_views(kv, KVFormat.PACKED) for kv in kvs]
    slots = paged.token_slots([3, 6], 2, 14, BLOCK, kernel, "cpu")
    assert torch.equal(got, gather_rows(planes, *slots))


def test_too_few_blocks_is_an_error() -> None:
    with pytest.raises(ValueError, match="need 2 blocks"):
        paged.token_slots([1], 0, BLOCK + 1, BLOCK, BLOCK, "cpu")


def test_layers_with_different_layouts_are_refused() -> None:
    kvs = make_layers(KVFormat.PACKED, 0)
    with pytest.raises(ValueError, match="share one KV layout"):
        PagedKV([kvs[0], kvs[1].contiguous()], KVFormat.PACKED)


#: Operators that only make a new view or an empty tensor: no data moves, no kernel launches.
METADATA_OPS = frozenset(
    "aten::" + name
    for name in [
        "view",
        "select",
        "slice",
        "as_strided",
        "permute",
        "transpose",
        "reshape",
        "_reshape_alias",
        "expand",
        "unsqueeze",
        "squeeze",
        "split",
        "narrow",
        "alias",
        "t",
        "detach",
        "empty",
        "lift_fresh",
        "_unsafe_view",
        "split_with_sizes",
    ]
)


def _top_level_ops(fn: Callable[[], object]) -> int:
    """Data-moving operators the profiler sees called from Python (on a GPU each is at least
    one kernel launch); operators they call themselves are not counted again."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    inside = {id(c) for e in events for c in e.cpu_children}
    return sum(1 for e in events if id(e) not in inside and e.name not in METADATA_OPS)


@pytest.mark.parametrize("fmt", [KVFormat.PACKED, KVFormat.CPU_PAGED, KVFormat.MLA])
@pytest.mark.parametrize("layers", [4, 32])
def test_a_chunk_copy_costs_one_op_per_layer_plus_a_constant(fmt: KVFormat, layers: int) -> None:
    width = HEAD if fmt.planes == 1 else 2 * HEAD
    heads = 1 if fmt is KVFormat.MLA else HEADS
    buffer = torch.randn(BLOCKS, layers, heads, BLOCK, width)
    pk = PagedKV([buffer[:, i] for i in range(layers)], fmt)
    tokens = 4 * BLOCK
    table = torch.tensor([5, 2, 11, 7])
    scratch = pk.scratch_view(torch.empty(pk.scratch_numel(tokens)), tokens)
    out = torch.empty(pk.chunk_shape(tokens))
    index = pk.index(table, 0, tokens)

    def gather_chunk() -> None:
        pk.gather(index, scratch)
        pk.to_chunk(scratch, tokens, out)

    def scatter_chunk() -> None:
        pk.from_chunk(out, scratch)
        pk.scatter(index, scratch)

    gather = _top_level_ops(gather_chunk)
    scatter = _top_level_ops(scatter_chunk)
    indexing = _top_level_ops(lambda: pk.index(table, 0, tokens))
    assert gather <= layers + 4, gather
    assert scatter <= layers + 4, scatter
    assert indexing <= 16, indexing
