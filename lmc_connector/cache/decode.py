"""The load path's view of chunks: plain tensors on a device, decoding encoded chunks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from lmc_connector.cache.chunk import Chunk

if TYPE_CHECKING:
    from lmc_connector.ops.allocator import Allocator
    from lmc_connector.ops.codecs import CalibrationSource, CodecError


def to_tensors(
    chunks: Sequence[Chunk],
    device: torch.device | str | None = None,
    calibrations: CalibrationSource | None = None,
) -> list[torch.Tensor]:
    """The tensor form of each chunk on `device` (default CPU), decoding where needed; a
    calibrated codec's chunk with its calibration from `calibrations`.

    Raises `CodecError` for a blob that fails validation or whose calibration
    is not found (`MissingCalibrationError`).
    """
    tensors, error = decoded_prefix(chunks, device, calibrations)
    if error is not None:
        raise error
    return tensors


def decoded_prefix(
    chunks: Sequence[Chunk],
    device: torch.device | str | None = None,
    calibrations: CalibrationSource | None = None,
    allocate: Allocator | None = None,
) -> tuple[list[torch.Tensor], CodecError | None]:
    """The tensors of the leading chunks that decode, and why the next one did not (None
    when all did): the chunks from there on are misses. Decoded chunks get their memory
    from `allocate` (on `device`) where given; plain ones are returned as stored.

    Runs of encoded chunks of one method are decoded with one batched codec
    call (one by one when the batch fails, to keep the good prefix). Codecs are
    imported on the first encoded chunk, so a cache that never compresses never
    loads them.
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
        blobs = [c.blob for c in chunks[i:j] if c.blob is not None]
        error = _decode_run(blobs, target, calibrations, allocate, out)
        if error is not None:
            return out, error
        i = j
    return out, None


def _decode_run(
    blobs: list[bytes | memoryview],
    device: torch.device,
    calibrations: CalibrationSource | None,
    allocate: Allocator | None,
    out: list[torch.Tensor],
) -> CodecError | None:
    """Append the tensors of `blobs` (one codec) to `out`, up to the first that fails."""
    from lmc_connector.ops.codecs import CodecError, decode_blob, get_codec, peek_header

    try:
        header = peek_header(blobs[0])
        if header.calibration_id is None:
            out.extend(get_codec(header.codec).decode_batch(blobs, device, allocate))
            return None
    except CodecError:
        pass
    for blob in blobs:
        try:
            out.append(decode_blob(blob, device, calibrations, allocate))
        except CodecError as e:
            return e
    return None
