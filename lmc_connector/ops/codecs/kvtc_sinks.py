"""Attention sinks in `kvtc`: found per chunk, coded apart, finely, in the channel space.

A sink is a token that absorbs attention and passes back almost nothing: its V is close to
zero (in a decoder LLM the first token of every sequence; in BERT the [CLS] token). Because
so much attention lands on it, an error in its K or V shifts every output, and because it
is unlike the other tokens, the transform fitted on ordinary tokens may not span it. So a
sink's coefficients are left out of the transform code (they would also inflate the shift
of every component they touch) and its scaled, centred values (x - mean) / scale are stored
in the channel space with a step of step / FINE, per layer at the bit width its largest value
needs: any direction is kept, to 1/16 of the transform's step.
"""

from __future__ import annotations

import struct

import torch

from lmc_connector.ops.codecs import bitpack
from lmc_connector.ops.codecs.errors import CodecError

# A token is a sink when its V norm, in some layer, is below this fraction of the layer's
# median V norm (real non-sink tokens of all-MiniLM-L6-v2 stay above 0.24, its [CLS] is ~0.04).
SINK_RATIO = 0.125
MAX_SINKS = 16
FINE = 8
MAX_WIDTH = 24  # |value| < 2**23 steps / FINE


def find(v: torch.Tensor) -> list[torch.Tensor]:
    """Per chunk of v [layers, chunks, tokens, channels] (the last plane: V, or the MLA
    latent): the sorted token indices (int64) of its sinks, at most MAX_SINKS (the most
    extreme)."""
    norm = (v * v).sum(-1)
    median = norm.median(-1, keepdim=True).values
    ratio = (norm / median.clamp_min(1e-30)).amin(0)  # [chunks, tokens], squared norms
    out = []
    for r in ratio:
        idx = torch.nonzero(r < SINK_RATIO**2).flatten()
        if idx.numel() > MAX_SINKS:
            idx = idx[r[idx].argsort()[:MAX_SINKS]]
        out.append(idx.sort().values)
    return out


def pack(z: torch.Tensor, step: float) -> bytes:
    """The section for one chunk's sinks: z [layers, sinks, dims] (scaled, centred values)."""
    if z.shape[1] == 0:
        return b""
    limit = (1 << (MAX_WIDTH - 1)) - 1
    q = torch.round(z * (FINE / step)).clamp_(-limit, limit).to(torch.int64)
    zigzag = (q << 1) ^ (q >> 63)
    widths = [int(v).bit_length() for v in zigzag.amax((1, 2)).tolist()]
    body = [bitpack.pack(zz, w) for zz, w in zip(zigzag, widths, strict=True) if w]
    return bytes(widths) + b"".join(body)


def unpack(
    buf: memoryview, layers: int, sinks: int, dims: int, step: float, dev: torch.device
) -> torch.Tensor:
    """Inverse of `pack`: z [layers, sinks, dims] (float32)."""
    if sinks == 0:
        if len(buf):
            raise CodecError(f"kvtc sink section of {len(buf)} bytes for no sinks")
        return torch.zeros(layers, 0, dims, dtype=torch.float32, device=dev)
    if len(buf) < layers:
        raise CodecError(f"kvtc sink section of {len(buf)} bytes is truncated")
    widths = struct.unpack_from(f"{layers}B", buf)
    sizes = [bitpack.packed_size(sinks * dims, w) for w in widths]
    if any(w > MAX_WIDTH for w in widths) or len(buf) != layers + sum(sizes):
        raise CodecError(
            f"kvtc sink section of {len(buf)} bytes does not fit widths {list(widths)}"
        )
    out = torch.zeros(layers, sinks * dims, dtype=torch.int64, device=dev)
    at = layers
    for layer, (w, size) in enumerate(zip(widths, sizes, strict=True)):
        if w:
            out[layer] = bitpack.unpack(buf[at : at + size], sinks * dims, w, dev)
        at += size
    q = (out >> 1) ^ -(out & 1)
    return q.view(layers, sinks, dims).float() * (step / FINE)
