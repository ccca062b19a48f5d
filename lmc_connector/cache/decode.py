"""The load path's view of chunks: plain tensors on a device, decoding encoded chunks."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lmc_connector.cache.chunk import Chunk

if TYPE_CHECKING:
    from lmc_connector.ops.codecs import CalibrationSource, CodecError


def to_tensors(
    chunks: list[Chunk],
    device: torch.device | str | None = None,
    calibrations: CalibrationSource | None = None,
) -> list[torch.Tensor]:
    """The tensor form of each chunk on `device` (default CPU), decoding where needed; a
    calibrated codec's chunk with its calibration from `calibrations`.

    Codecs are imported on the first encoded chunk, so a cache that never
    compresses never loads them. Raises `CodecError` for a blob that fails
    validation or whose calibration is not found (`MissingCalibrationError`).
    """
    tensors, error = decoded_prefix(chunks, device, calibrations)
    if error is not None:
        raise error
    return tensors


def decoded_prefix(
    chunks: list[Chunk],
    device: torch.device | str | None = None,
    calibrations: CalibrationSource | None = None,
) -> tuple[list[torch.Tensor], CodecError | None]:
    """The tensors of the leading chunks that decode, and why the next one did not (None
    when all did): the chunks from there on are misses."""
    target = torch.device(device) if device is not None else torch.device("cpu")
    out: list[torch.Tensor] = []
    for chunk in chunks:
        if chunk.kv is not None:
            out.append(chunk.kv.to(target))
            continue
        from lmc_connector.ops.codecs import CodecError, decode_blob

        assert chunk.blob is not None
        try:
            out.append(decode_blob(chunk.blob, device=target, calibrations=calibrations))
        except CodecError as e:
            return out, e
    return out, None
