"""An independent, obviously-correct copy between paged planes and chunk tensors: the oracle
the fast copies of `lmc_connector.ops.paged.PagedKV` are checked against.

Per-plane advanced indexing, one token row at a time in spirit: slow, simple.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def gather_rows(
    layers: Sequence[Sequence[torch.Tensor]], blocks: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """`[planes, layers, tokens, channels]` from plane views (`paged.plane_views`)."""
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


def scatter_rows(
    layers: Sequence[Sequence[torch.Tensor]],
    blocks: torch.Tensor,
    offsets: torch.Tensor,
    kv: torch.Tensor,
) -> None:
    """Write `[planes, layers, tokens, channels]` into plane views at the given slots."""
    first = layers[0][0]
    tokens = blocks.numel()
    heads, head_size = first.shape[1], first.shape[3]
    for layer, planes in enumerate(layers):
        for plane, view in enumerate(planes):
            view[blocks, :, offsets] = kv[plane, layer].reshape(tokens, heads, head_size)
