"""The load path's view of chunks: plain tensors on a device, decoding encoded chunks."""

from __future__ import annotations

import torch

from lmc_connector.cache.chunk import Chunk


def to_tensors(chunks: list[Chunk], device: torch.device | str | None = None) -> list[torch.Tensor]:
    """The tensor form of each chunk on `device` (default CPU), decoding where needed.

    Codecs are imported on the first encoded chunk, so a cache that never
    compresses never loads them. Raises `CodecError` for a blob that fails
    validation: the caller treats that chunk as a miss.
    """
    target = torch.device(device) if device is not None else torch.device("cpu")
    out: list[torch.Tensor] = []
    for chunk in chunks:
        if chunk.kv is not None:
            out.append(chunk.kv.to(target))
        else:
            from lmc_connector.ops.codecs import decode_blob

            assert chunk.blob is not None
            out.append(decode_blob(chunk.blob, device=target))
    return out
