"""`cachegen`: CacheGen-style quantization + vectorised rANS with a compact per-chunk model.

Sections: scales (int16 base + uint8 code per (K/V, layer, token)), channel side info
(bit-packed), rANS final states (u32 per stream), rANS words (u16). Streams: the chunk's
(K/V, layer) blocks are split into `groups` runs; stream = (run, channel), so a stream holds
`blocks / groups * tokens` symbols and the coder loop runs that many steps.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import torch

from lmc_connector.ops.codecs import bitpack, rans
from lmc_connector.ops.codecs import cachegen_model as model
from lmc_connector.ops.codecs import format as fmt
from lmc_connector.ops.codecs._tensors import from_bytes, resolve_device, to_bytes
from lmc_connector.ops.codecs.errors import CodecError

CODEC_ID = 2
MAX_HALF_LEVELS = 15
_PARAMS = struct.Struct("<BH")  # model revision, stream groups; then C per layer (u8 each)
_REVISION = 1


def _groups(blocks: int, tokens: int, min_steps: int) -> int:
    """The most streams (a divisor of blocks) that still leaves >= min_steps symbols each."""
    best = 1
    for g in range(1, blocks + 1):
        if blocks % g == 0 and (blocks // g) * tokens >= min_steps:
            best = g
    return best


class CacheGenCodec:
    name = "cachegen"

    def __init__(self, levels: Sequence[int] = (21, 17, 13), min_steps: int = 1024) -> None:
        levels = tuple(int(v) for v in levels)
        if not levels or any(v % 2 == 0 or not 3 <= v <= 2 * MAX_HALF_LEVELS + 1 for v in levels):
            raise ValueError(f"levels must be odd counts in [3, 31], got {levels}")
        if min_steps < 1:
            raise ValueError(f"min_steps must be positive, got {min_steps}")
        self.levels = levels
        self.min_steps = min_steps

    def encode(self, kv: torch.Tensor) -> bytes:
        return self.encode_batch([kv])[0]

    def decode(self, blob: bytes, device: torch.device | str | None = None) -> torch.Tensor:
        return self.decode_batch([blob], device)[0]

    def encode_batch(self, kvs: Sequence[torch.Tensor]) -> list[bytes]:
        out: list[bytes | None] = [None] * len(kvs)
        for idx in _group_by(kvs, lambda kv: (tuple(kv.shape), kv.dtype, kv.device)):
            for i, blob in zip(idx, self._encode_same([kvs[i] for i in idx]), strict=True):
                out[i] = blob
        return [b for b in out if b is not None]

    def _encode_same(self, kvs: list[torch.Tensor]) -> list[bytes]:
        for kv in kvs:
            fmt.check_kv(kv)
        e, layers, tokens, channels = kvs[0].shape
        nb, blocks = len(kvs), e * layers
        half = torch.tensor(model.default_layer_levels(layers, self.levels), device=kvs[0].device)
        cmax = int(half.max())
        groups = _groups(blocks, tokens, self.min_steps)
        x = torch.stack(kvs).float().view(nb, e, layers, tokens, channels)
        base, codes = model.scale_codes(x.abs().amax(-1).view(nb, -1))
        scale = model.scales_from_codes(base, codes).view(nb, e, layers, tokens, 1)
        hf = half.to(x.dtype).view(layers, 1, 1)
        q = torch.maximum(torch.minimum(torch.round(x * (hf / scale)), hf), -hf)
        m, dist, side = model.fit_channels(q, half, cmax)
        r = (q - m.unsqueeze(-2) + 2 * cmax).to(torch.uint8)
        per = blocks // groups
        syms = r.view(nb, groups, per, tokens, channels).permute(2, 3, 0, 1, 4)
        dists = dist.view(nb, groups, per, channels).permute(2, 0, 1, 3)
        words, states = rans.encode(
            syms.reshape(per * tokens, nb, groups * channels),
            dists.reshape(per, nb, groups * channels),
            tokens,
            model.TABLES.get(cmax, x.device),
        )
        params = _PARAMS.pack(_REVISION, groups) + bytes(half.tolist())
        width = model.side_width(cmax)
        blobs = []
        for b in range(nb):
            sections = [
                struct.pack("<h", int(base[b])) + to_bytes(codes[b]),
                to_bytes(bitpack.pack(side[b].reshape(-1), width)),
                to_bytes(states[b].to(torch.int64).to(torch.int32)),
                to_bytes(words[b].to(torch.int32).to(torch.int16)),
            ]
            blobs.append(fmt.pack(CODEC_ID, kvs[b].dtype, kvs[b].shape, params, sections))
        return blobs

    def decode_batch(
        self, blobs: Sequence[bytes], device: torch.device | str | None = None
    ) -> list[torch.Tensor]:
        from lmc_connector.ops.codecs.registry import peek_header

        headers = [peek_header(b) for b in blobs]
        for h in headers:
            if h.codec != self.name:
                raise CodecError(f"blob holds codec {h.codec!r}, not {self.name!r}")
        dev = resolve_device(device)
        out: list[torch.Tensor | None] = [None] * len(blobs)
        for idx in _group_by(headers, lambda h: (h.shape, h.params, h.dtype)):
            parts = [(headers[i], blobs[i]) for i in idx]
            for i, t in zip(idx, _decode_same(parts, dev), strict=True):
                out[i] = t
        return [t for t in out if t is not None]


def _group_by(items: Sequence, key) -> list[list[int]]:  # type: ignore[no-untyped-def]
    groups: dict = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item), []).append(i)
    return list(groups.values())


def _layout(header: fmt.BlobHeader) -> tuple[int, list[int]]:
    e, layers, _tokens, _channels = header.shape
    params = header.params
    if len(params) != _PARAMS.size + layers:
        raise CodecError(f"cachegen params of {len(params)} bytes do not fit {layers} layers")
    revision, groups = _PARAMS.unpack_from(params)
    half = list(params[_PARAMS.size :])
    if revision != _REVISION:
        raise CodecError(f"unsupported cachegen model revision {revision}")
    if groups < 1 or (e * layers) % groups or any(not 1 <= c <= MAX_HALF_LEVELS for c in half):
        raise CodecError(f"invalid cachegen params: groups={groups}, half-levels={half}")
    return groups, half


def _decode_same(
    parts: list[tuple[fmt.BlobHeader, bytes]], dev: torch.device
) -> list[torch.Tensor]:
    header = parts[0][0]
    e, layers, tokens, channels = header.shape
    groups, half_list = _layout(header)
    cmax = max(half_list)
    blocks, nb = e * layers, len(parts)
    streams, per = groups * channels, blocks // groups
    width = model.side_width(cmax)
    fixed = [2 + blocks * tokens, bitpack.packed_size(blocks * channels, width), 4 * streams, None]
    words, bases, codes, sides, states = [], [], [], [], []
    for h, blob in parts:
        fmt.expect_sections(h, fixed)
        sc, sd, st, wd = h.sections(blob)
        if len(wd) % 2:
            raise CodecError(f"cachegen word section has odd length {len(wd)}")
        if h.numel > rans.SYMBOLS_PER_WORD_BOUND * (len(wd) // 2 + streams):
            raise CodecError(
                f"header claims {h.numel} elements, more than {len(wd)} bytes can encode"
            )
        (base,) = struct.unpack_from("<h", sc)
        if not -8 * 160 <= base <= 8 * 127 - 255:
            raise CodecError(f"cachegen scale base {base} out of range")
        bases.append(base)
        codes.append(from_bytes(sc[2:], torch.uint8, blocks * tokens, dev))
        sides.append(from_bytes(sd, torch.uint8, len(sd), dev))
        states.append(from_bytes(st, torch.int32, streams, dev).to(torch.int64) & 0xFFFFFFFF)
        words.append(from_bytes(wd, torch.int16, len(wd) // 2, dev).to(torch.int64) & 0xFFFF)
    side = torch.stack([bitpack.unpack(s, blocks * channels, width) for s in sides])
    m, dist, valid = model.unfit_channels(side, cmax)
    if not valid:
        raise CodecError("cachegen channel side information out of range")
    dists = dist.view(nb, groups, per, channels).permute(2, 0, 1, 3).reshape(per, nb, streams)
    syms, ok = rans.decode(words, torch.stack(states), dists, tokens, model.TABLES.get(cmax, dev))
    if not ok:
        raise CodecError("cachegen entropy-coded data is corrupt (rANS state check failed)")
    r = syms.view(per, tokens, nb, groups, channels).permute(2, 3, 0, 1, 4)
    m = m.view(nb, e, layers, 1, channels)
    q = r.reshape(nb, e, layers, tokens, channels).float() - 2 * cmax + m
    base_t = torch.tensor(bases, dtype=torch.int64, device=dev)
    scale = model.scales_from_codes(base_t, torch.stack(codes)).view(nb, e, layers, tokens, 1)
    half = torch.tensor(half_list, dtype=torch.float32, device=dev).view(layers, 1, 1)
    x = q * (scale / half)
    return [x[b].to(header.dtype) for b in range(nb)]
