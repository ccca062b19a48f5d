"""KV chunks as a cache would serve them back: rounded to a storage format, or through a
codec's encode and decode. Shared by `codec_quality.py` and `fidelity_floor.py`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lmc_connector.ops.codecs import decode_blob, get_codec

#: A chunk [K/V, layers, tokens, channels] -> the chunk as served (float32), and its bytes.
RoundTrip = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


def rounded(dtype: torch.dtype) -> RoundTrip:
    """Stored as `dtype`: a format, not a codec (the reference a codec is held against)."""
    size = torch.tensor([], dtype=dtype).element_size()
    return lambda kv: (kv.to(dtype).float(), kv.numel() * size)


def through_codec(name: str, dtype: torch.dtype | None = None, **params: Any) -> RoundTrip:
    """Encoded by codec `name` (from `dtype` when given, else the chunk's own) and decoded as
    a reader decodes any blob: by the codec and calibration it names."""
    codec = get_codec(name, **params)
    calibrations = {}
    if "calibration" in params:
        calibrations[codec.calibration.id] = codec.calibration  # type: ignore[attr-defined]

    def run(kv: torch.Tensor) -> tuple[torch.Tensor, int]:
        blob = codec.encode(kv if dtype is None else kv.to(dtype))
        return decode_blob(blob, calibrations=calibrations).float(), len(blob)

    return run
