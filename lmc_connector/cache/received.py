"""Chunks from bytes that crossed a process boundary (a peer's reply), checked against the
receiving worker's layout before anything is cached."""

from __future__ import annotations

import warnings

import torch

from lmc_connector.cache.chunk import Chunk
from lmc_connector.cache.layout import ChunkLayout


def chunk_from_bytes(
    layout: ChunkLayout, num_tokens: int, data: memoryview, method: str | None
) -> Chunk:
    """A chunk of `layout` from plain tensor bytes (their size checked: plain bytes carry
    no checksum, the channel's CURVE encryption authenticates them) or a codec blob (header
    and checksum verified): either way a view of `data`, which it keeps alive (no copy).
    Raises ValueError when the bytes are not a chunk of this layout."""
    if not 0 < num_tokens <= layout.chunk_size:
        raise ValueError(f"a chunk of {num_tokens} tokens does not fit chunk_size")
    shape = layout.shape(num_tokens)
    if method is not None:
        from lmc_connector.ops.codecs import CodecError, peek_header

        blob = data.toreadonly()
        try:
            header = peek_header(blob)
        except CodecError as e:
            raise ValueError(f"damaged {method} chunk: {e}") from e
        if header.codec != method or header.shape != shape:
            raise ValueError(
                f"{header.codec} chunk of shape {header.shape} is not a {method} chunk of "
                f"shape {shape}"
            )
        if header.dtype != layout.torch_dtype:
            raise ValueError(f"chunk dtype {header.dtype} is not the layout's {layout.dtype}")
        return Chunk(num_tokens, blob=blob, method=method)
    dtype = layout.torch_dtype
    if data.nbytes != layout.nbytes(num_tokens):
        raise ValueError(f"{data.nbytes} bytes are not a {shape} {layout.dtype} chunk")
    with warnings.catch_warnings():
        # A read-only buffer: cached chunks are never written, and the buffer pool never
        # recycles a borrowed chunk.
        warnings.simplefilter("ignore", UserWarning)
        kv = torch.frombuffer(data, dtype=torch.uint8)
    return Chunk(num_tokens, kv=kv.view(dtype).view(shape), borrowed=True)
