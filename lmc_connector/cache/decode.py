"""The load path's view of chunks: plain tensors on a device, decoding encoded chunks."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmc_connector.cache.chunk import Chunk


def to_tensors(
    chunks: Sequence[Chunk], device: torch.device | str | None = None
) -> list[torch.Tensor]:
    """The tensor form of each chunk on `device` (default CPU), decoding where needed.

    Runs of encoded chunks of one method are decoded with one batched codec
    call. Codecs are imported on the first encoded chunk, so a cache that never
    compresses never loads them. Raises `CodecError` for a blob that fails
    validation: the caller treats that chunk as a miss.
    """
    target = torch.device(device) if device is not None else torch.device("cpu")
    out: list[torch.Tensor] = []
    i = 0
    while i < len(chunks):
        chunk = chunks[i]
        if chunk.kv is not None:
            out.append(chunk.kv.to(target))
            i += 1
            continue
        j = i
        while j < len(chunks) and chunks[j].blob is not None and chunks[j].method == chunk.method:
            j += 1
        out.extend(_decode([c.blob for c in chunks[i:j] if c.blob is not None], target))
        i = j
    return out


def _decode(blobs: list[bytes], device: torch.device) -> list[torch.Tensor]:
    from lmc_connector.ops.codecs import get_codec, peek_header

    return get_codec(peek_header(blobs[0]).codec).decode_batch(blobs, device)
