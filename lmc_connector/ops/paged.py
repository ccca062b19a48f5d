"""Gather and scatter between vLLM's paged KV caches and chunk tensors.

Device-agnostic torch: the same code runs on CPU and CUDA tensors. Tokens are
addressed through index tensors (block ids and in-block offsets), so there is
no Python loop per token; the only loops are per layer and per plane (K, V).

vLLM hands each layer's cache to the connector as a 4-D view
`[blocks, kv_heads, block_size, C]` (possibly a non-contiguous view into one
buffer). What C holds depends on the attention backend, see `KVFormat`.
Chunk tensors are `[planes, layers, tokens, kv_heads * head_size]`.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import torch


class KVFormat(enum.Enum):
    """How one layer's `[blocks, kv_heads, block_size, C]` view stores K and V."""

    #: vLLM's CPU attention backend: C = 2 * head_size, and each (block, head) page is really
    #: `[2 * block_size, head_size]`: the block's K part, then its V part. The order inside
    #: the K part depends on the CPU's attention ISA (with "vec" it is transposed,
    #: `[head_size, block_size]`), so rows of the K part are not tokens: this format is only
    #: ever moved in whole blocks (`whole_blocks`), which is exact whatever the ISA.
    CPU_PAGED = "cpu_paged"
    #: FlashAttention / FlashInfer / Triton: C packs one token's K then V (head_size each).
    PACKED = "packed"
    #: MLA: one latent head (kv_heads == 1), C = latent size; a single plane.
    MLA = "mla"

    @property
    def planes(self) -> int:
        return 1 if self is KVFormat.MLA else 2

    @property
    def whole_blocks(self) -> bool:
        """Rows of a page are not tokens: copy whole blocks only (see CPU_PAGED)."""
        return self is KVFormat.CPU_PAGED


def plane_views(kv: torch.Tensor, fmt: KVFormat) -> list[torch.Tensor]:
    """Views `[blocks, kv_heads, block_size, head_size]` of each plane, sharing `kv`'s storage.

    Writing into a returned view writes the paged cache. For CPU_PAGED the two
    views are the two halves of each page, addressed as rows.
    """
    if kv.dim() != 4:
        raise ValueError(f"expected a 4-D paged KV view, got shape {tuple(kv.shape)}")
    blocks, heads, block_size, width = kv.shape
    if fmt is KVFormat.MLA:
        return [kv]
    if width % 2:
        raise ValueError(f"{fmt.value}: last dimension {width} is not K and V of equal size")
    head_size = width // 2
    if fmt is KVFormat.PACKED:
        return [kv[..., :head_size], kv[..., head_size:]]
    if kv.stride(3) != 1 or kv.stride(2) != width:
        raise ValueError(
            f"cpu_paged: each (block, head) page must be contiguous; strides are {kv.stride()}"
        )
    pages = kv.as_strided(
        (blocks, heads, 2 * block_size, head_size),
        (kv.stride(0), kv.stride(1), head_size, 1),
        kv.storage_offset(),
    )
    return [pages[:, :, :block_size], pages[:, :, block_size:]]


def token_slots(
    block_ids: Sequence[int] | torch.Tensor,
    start: int,
    end: int,
    block_size: int,
    kernel_block_size: int,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel block index, offset) of each token in [start, end) of a request.

    `block_ids` is the request's block table in the scheduler's blocks of
    `block_size` tokens; the kernel may split each into blocks of
    `kernel_block_size` tokens (consecutive kernel blocks per scheduler block).
    """
    if end < start or start < 0:
        raise ValueError(f"bad token range [{start}, {end})")
    if block_size % kernel_block_size:
        raise ValueError(f"block size {block_size} is not a multiple of {kernel_block_size}")
    table = torch.as_tensor(block_ids, dtype=torch.long, device=device)
    positions = torch.arange(start, end, dtype=torch.long, device=device)
    needed = (end + block_size - 1) // block_size
    if table.numel() < needed:
        raise ValueError(f"tokens up to {end} need {needed} blocks; the table has {table.numel()}")
    slots = table[positions // block_size] * block_size + positions % block_size
    return slots // kernel_block_size, slots % kernel_block_size


def gather(
    layers: Sequence[Sequence[torch.Tensor]], blocks: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """Copy tokens out of paged planes into a new `[planes, layers, tokens, channels]` tensor.

    `layers[l][p]` is plane p of layer l as returned by `plane_views`.
    """
    first = layers[0][0]
    tokens = blocks.numel()
    channels = first.shape[1] * first.shape[3]
    out = torch.empty(
        (len(layers[0]), len(layers), tokens, channels), dtype=first.dtype, device=first.device
    )
    for layer, planes in enumerate(layers):
        for plane, view in enumerate(planes):
            out[plane, layer] = view[blocks, :, offsets].reshape(tokens, channels)
    return out


def scatter(
    layers: Sequence[Sequence[torch.Tensor]],
    blocks: torch.Tensor,
    offsets: torch.Tensor,
    kv: torch.Tensor,
) -> None:
    """Write `kv` `[planes, layers, tokens, channels]` into the paged planes at the given slots."""
    tokens = blocks.numel()
    if kv.dim() != 4 or kv.shape[0] != len(layers[0]) or kv.shape[1] != len(layers):
        raise ValueError(f"chunk of shape {tuple(kv.shape)} does not match {len(layers)} layers")
    if kv.shape[2] != tokens:
        raise ValueError(f"chunk holds {kv.shape[2]} tokens but {tokens} slots were given")
    first = layers[0][0]
    src = kv.to(device=first.device, dtype=first.dtype)
    heads, head_size = first.shape[1], first.shape[3]
    for layer, planes in enumerate(layers):
        for plane, view in enumerate(planes):
            view[blocks, :, offsets] = src[plane, layer].reshape(tokens, heads, head_size)


def _page_parts(kv: torch.Tensor) -> tuple[int, int, int, int]:
    blocks, heads, block_size, width = kv.shape
    return blocks, heads, block_size, width // 2


def gather_blocks(kvs: Sequence[torch.Tensor], blocks: torch.Tensor) -> torch.Tensor:
    """Whole CPU_PAGED blocks as `[2, layers, len(blocks) * block_size, kv_heads * head_size]`.

    Row r of block i lands at token index i * block_size + r: the same rows
    `plane_views` addresses, moved with one `index_select` per layer.
    """
    _, heads, block_size, head_size = _page_parts(kvs[0])
    n = blocks.numel()
    out = torch.empty(
        (2, len(kvs), n * block_size, heads * head_size), dtype=kvs[0].dtype, device=kvs[0].device
    )
    for layer, kv in enumerate(kvs):
        pages = kv.index_select(0, blocks).view(n, heads, 2, block_size, head_size)
        out[:, layer] = pages.permute(2, 0, 3, 1, 4).reshape(2, n * block_size, heads * head_size)
    return out


def scatter_blocks(kvs: Sequence[torch.Tensor], blocks: torch.Tensor, kv: torch.Tensor) -> None:
    """Inverse of `gather_blocks`: write whole blocks with one `index_copy_` per layer."""
    _, heads, block_size, head_size = _page_parts(kvs[0])
    n = blocks.numel()
    if kv.shape != (2, len(kvs), n * block_size, heads * head_size):
        raise ValueError(f"chunk of shape {tuple(kv.shape)} does not fill {n} whole blocks")
    src = kv.to(device=kvs[0].device, dtype=kvs[0].dtype)
    for layer, dst in enumerate(kvs):
        pages = src[:, layer].reshape(2, n, block_size, heads, head_size).permute(1, 3, 0, 2, 4)
        dst.index_copy_(0, blocks, pages.reshape(n, heads, block_size, 2 * head_size))
