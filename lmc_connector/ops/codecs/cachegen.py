"""`cachegen`: CacheGen-style quantization + vectorised rANS with a compact per-chunk model.

Sections: scales (int16 base + uint8 code per (K/V, layer, token)), channel side info
(bit-packed), rANS final states (u32 per stream), then the rANS words (u16) of each lane.

Streams: the chunk's (K/V, layer) blocks are split into `groups` equal parts; a stream is
(part, channel), so it holds `blocks / groups * tokens` symbols and the coder runs that many
steps; its 4-byte final state costs 32 / steps bits per element (~0.06 at 512 steps). The
native coder (CPU) runs at the same speed whatever the steps: min_steps = 512. The torch coder
pays ~16 tensor ops per step, so where it runs, chunks with few streams (at most
_SMALL_STREAMS) go down to min_steps / 2 (MiniLM [2, 6, 256, 384]: ~1.6x faster for +0.05
bits/element) while wide chunks keep min_steps (twice the streams would push its per-step
buffers out of cache). The streams are split into `lanes` equal runs, coded independently so
that a CPU codes them on parallel threads (rans.py).

Speed on CPU: the (de)quantization is two sweeps of C over the chunk (cachegen_native.py)
where the kernels could be built, else torch ops in slices of a few MB (bounded temporaries),
as on a GPU; the coder is int32 throughout, in C where it could be built, its lanes on
parallel threads (rans.py). Both ways write and read the same bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import torch

from lmc_connector.ops.allocator import Allocator
from lmc_connector.ops.codecs import bitpack, cachegen_native, rans, threads
from lmc_connector.ops.codecs import cachegen_model as model
from lmc_connector.ops.codecs import format as fmt
from lmc_connector.ops.codecs._tensors import from_bytes, group_by, resolve_device, to_bytes
from lmc_connector.ops.codecs.errors import CodecError
from lmc_connector.ops.codecs.registry import codec_id

CODEC_ID = codec_id("cachegen")
MAX_HALF_LEVELS = 15
# model revision, stream groups, lanes; then C per layer (u8 each)
_PARAMS = struct.Struct("<BHB")
_REVISION = 3  # 2: int32 rANS state (L = 2**15); 3: lanes
MAX_LANES = 4
_LANE_STREAMS = 256  # fewest streams per lane
_SMALL_STREAMS = 8192  # see the module docstring


def _groups(blocks: int, tokens: int, channels: int, min_steps: int, native: bool) -> int:
    """The most parts (a divisor of blocks) that still leave >= min_steps symbols per stream,
    or, for the torch coder, >= min_steps / 2 while the streams stay at most _SMALL_STREAMS."""
    best = 1
    small = _SMALL_STREAMS if not native else 0
    for g in range(1, blocks + 1):
        steps = (blocks // g) * tokens
        if blocks % g == 0 and (
            steps >= min_steps or (2 * steps >= min_steps and g * channels <= small)
        ):
            best = g
    return best


class CacheGenCodec:
    """A cachegen codec with its level settings; stateless beyond them: any thread may encode
    and decode (the distribution tables are shared, built once per device)."""

    name = "cachegen"

    def __init__(self, levels: Sequence[int] = (21, 17, 13), min_steps: int = 512) -> None:
        levels = tuple(int(v) for v in levels)
        if not levels or any(v % 2 == 0 or not 3 <= v <= 2 * MAX_HALF_LEVELS + 1 for v in levels):
            raise ValueError(f"levels must be odd counts in [3, 31], got {levels}")
        if min_steps < 1:
            raise ValueError(f"min_steps must be positive, got {min_steps}")
        self.levels = levels
        self.min_steps = min_steps

    def encode(self, kv: torch.Tensor) -> bytes:
        return self.encode_batch([kv])[0]

    def decode(
        self,
        blob: bytes | memoryview,
        device: torch.device | str | None = None,
        allocate: Allocator | None = None,
    ) -> torch.Tensor:
        return self.decode_batch([blob], device, allocate)[0]

    def encode_batch(self, kvs: Sequence[torch.Tensor]) -> list[bytes]:
        out: list[bytes | None] = [None] * len(kvs)
        for idx in group_by(kvs, lambda kv: (tuple(kv.shape), kv.dtype, kv.device)):
            for i, blob in zip(idx, self._encode_same([kvs[i] for i in idx]), strict=True):
                out[i] = blob
        return [b for b in out if b is not None]

    def _encode_same(self, kvs: list[torch.Tensor]) -> list[bytes]:
        for kv in kvs:
            fmt.check_kv(kv)
        e, layers, tokens, channels = kvs[0].shape
        # The coder indexes one int32 buffer over the batch's symbols: keep it well in range.
        per_call = max(1, (1 << 30) // kvs[0].numel())
        if len(kvs) > per_call:
            return [
                b
                for i in range(0, len(kvs), per_call)
                for b in self._encode_same(kvs[i : i + per_call])
            ]
        nb, blocks = len(kvs), e * layers
        dev = kvs[0].device
        half_list = model.default_layer_levels(layers, self.levels)
        cmax = max(half_list)
        groups = _groups(blocks, tokens, channels, self.min_steps, rans.native_on(dev))
        per = blocks // groups
        x = (kvs[0].unsqueeze(0) if nb == 1 else torch.stack(kvs)).reshape(
            nb, blocks, tokens, channels
        )
        amax = _absmax_rows(x)
        if not bool(torch.isfinite(amax).all()):
            big = torch.finfo(x.dtype).max
            x = torch.nan_to_num(x, nan=0.0, posinf=big, neginf=-big)
            amax = _absmax_rows(x)
        base, codes = model.scale_codes(amax.view(nb, -1))
        half = torch.tensor(half_list * e, dtype=torch.float32, device=dev)  # C per block
        scale = model.scales_from_codes(base, codes).view(nb, blocks, tokens)
        factor = half.view(blocks, 1) / scale  # [nb, blocks, tokens]
        tables = model.TABLES.get(cmax, dev)
        sym_codes, side = _quantize(x, factor, half, groups, cmax, tables)
        streams = groups * channels
        lanes = _lanes(streams)
        coded = rans.encode(sym_codes.view(per * tokens, nb * lanes, streams // lanes), tables)
        params = _PARAMS.pack(_REVISION, groups, lanes) + bytes(half_list)
        width = model.side_width(cmax)
        blobs = []
        for b in range(nb):
            sections = [
                struct.pack("<h", int(base[b])) + to_bytes(codes[b]),
                bitpack.pack(side[b], width),
                b"".join(states for _, states in coded[b * lanes : (b + 1) * lanes]),
                *(words for words, _ in coded[b * lanes : (b + 1) * lanes]),
            ]
            blobs.append(fmt.pack(CODEC_ID, kvs[b].dtype, kvs[b].shape, params, sections))
        return blobs

    def decode_batch(
        self,
        blobs: Sequence[bytes | memoryview],
        device: torch.device | str | None = None,
        allocate: Allocator | None = None,
    ) -> list[torch.Tensor]:
        from lmc_connector.ops.codecs.registry import peek_header

        headers = [peek_header(b) for b in blobs]
        for h in headers:
            if h.codec != self.name:
                raise CodecError(f"blob holds codec {h.codec!r}, not {self.name!r}")
        dev = resolve_device(device)
        out: list[torch.Tensor | None] = [None] * len(blobs)
        for idx in group_by(headers, lambda h: (h.shape, h.params, h.dtype)):
            parts = [(headers[i], blobs[i]) for i in idx]
            for i, t in zip(idx, _decode_same(parts, dev, allocate), strict=True):
                out[i] = t
        return [t for t in out if t is not None]


def _quantize(
    x: torch.Tensor,
    factor: torch.Tensor,
    half: torch.Tensor,
    groups: int,
    cmax: int,
    tables: rans.RansTables,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The coder's codes [per * tokens, nb, groups * channels] (int16) and the side info
    [nb, groups, per, channels] of x [nb, blocks, tokens, channels]: with the C kernels on a
    CPU where they could be built, else in torch ops (any device), slice by slice."""
    nb, blocks, tokens, channels = x.shape
    per, dev = blocks // groups, x.device
    lib = cachegen_native.library() if dev.type == "cpu" else None
    if lib is not None:
        rows = nb * blocks
        q, s1, s2 = cachegen_native.quantize(
            lib, x.view(rows, tokens, channels), factor.reshape(rows, tokens)
        )
        by_block = (nb, blocks, channels)
        m, dist, sd = model.fit_channels(
            s1.float().view(by_block), s2.float().view(by_block), tokens, half.view(blocks, 1), cmax
        )
        off = (dist * tables.alphabet - m.long() + 2 * cmax).view(rows, channels)
        codes = cachegen_native.codes(lib, q, off, nb, groups, per)
        return codes, sd.view(nb, groups, per, channels)
    factor5 = factor.view(nb, groups, per, tokens, 1)
    sym_codes = torch.empty((per, tokens, nb, groups, channels), dtype=torch.int16, device=dev)
    side = torch.empty((nb, groups, per, channels), dtype=torch.int64, device=dev)
    x5 = x.view(nb, groups, per, tokens, channels)
    half5 = half.view(groups, per, 1)
    for p, g0, g1 in _slices(per, groups, nb * tokens * channels, dev):
        # Same-dtype elementwise ops only: mixed-dtype ones are many times slower on CPU.
        y = x5[:, g0:g1, p].to(torch.float32, copy=True)
        y.mul_(factor5[:, g0:g1, p])
        y.round_()
        s1 = y.sum(-2)
        s2 = (y * y).sum(-2)
        m, dist, sd = model.fit_channels(s1, s2, tokens, half5[g0:g1, p], cmax)
        side[:, g0:g1, p] = sd
        y.add_((dist * tables.alphabet - m.long() + 2 * cmax).to(y.dtype).unsqueeze(-2))
        sym_codes[p, :, :, g0:g1].copy_(y.permute(2, 0, 1, 3))
    return sym_codes.view(per * tokens, nb, groups * channels), side


def _lanes(streams: int) -> int:
    """The most lanes (up to MAX_LANES) that divide the streams into runs of at least
    _LANE_STREAMS."""
    return max(
        n
        for n in range(1, MAX_LANES + 1)
        if n == 1 or (streams % n == 0 and streams // n >= _LANE_STREAMS)
    )


def _layout(header: fmt.BlobHeader) -> tuple[int, int, list[int]]:
    e, layers, _tokens, _channels = header.shape
    params = header.params
    if len(params) != _PARAMS.size + layers:
        raise CodecError(f"cachegen params of {len(params)} bytes do not fit {layers} layers")
    revision, groups, lanes = _PARAMS.unpack_from(params)
    half = list(params[_PARAMS.size :])
    if revision != _REVISION:
        raise CodecError(f"unsupported cachegen model revision {revision}")
    if groups < 1 or (e * layers) % groups or any(not 1 <= c <= MAX_HALF_LEVELS for c in half):
        raise CodecError(f"invalid cachegen params: groups={groups}, half-levels={half}")
    if not 1 <= lanes <= MAX_LANES or (groups * header.shape[3]) % lanes:
        raise CodecError(f"invalid cachegen params: {lanes} lanes for {groups} groups")
    return groups, lanes, half


def _absmax_rows(x: torch.Tensor) -> torch.Tensor:
    """max |x| over the last dim, as float32. On the bits: clearing the sign bit leaves
    integers ordered like the magnitudes (NaN above inf), and integer reductions are several
    times faster than float16 ones on CPU."""
    bits = torch.int16 if x.dtype in (torch.float16, torch.bfloat16) else torch.int32
    mask = 0x7FFF if bits == torch.int16 else 0x7FFFFFFF
    return (x.view(bits) & mask).amax(-1).view(x.dtype).float()


def _slices(per: int, groups: int, group_elems: int, dev: torch.device):  # type: ignore[no-untyped-def]
    """(p, g0, g1) slices of the [groups, per] blocks of ~SLICE_ELEMS elements each: on CPU
    the torch (de)quantization runs slice by slice so that its float32 temporaries stay a
    few MB whatever the chunk (a Llama-3.1-8B chunk is 16M elements)."""
    target = cachegen_native.SLICE_ELEMS if dev.type == "cpu" else 1 << 62
    step = max(1, min(groups, target // max(1, group_elems)))
    for p in range(per):
        for g0 in range(0, groups, step):
            yield p, g0, min(groups, g0 + step)


def _decode_same(
    parts: list[tuple[fmt.BlobHeader, bytes | memoryview]],
    dev: torch.device,
    allocate: Allocator | None,
) -> list[torch.Tensor]:
    header = parts[0][0]
    e, layers, tokens, channels = header.shape
    groups, lanes, half_list = _layout(header)
    cmax = max(half_list)
    blocks, nb = e * layers, len(parts)
    streams, per = groups * channels, blocks // groups
    width = model.side_width(cmax)
    fixed = [2 + blocks * tokens, bitpack.packed_size(blocks * channels, width), 4 * streams]
    words: list[memoryview] = []
    bases, codes, sides, states = [], [], [], []
    for h, blob in parts:
        fmt.expect_sections(h, [*fixed, *[None] * lanes])
        sc, sd, st, *wd = h.sections(blob)
        size = sum(len(w) for w in wd)
        if any(len(w) % 2 for w in wd):
            raise CodecError(f"cachegen word sections of odd length {[len(w) for w in wd]}")
        if h.numel > rans.SYMBOLS_PER_WORD_BOUND * (size // 2 + streams):
            raise CodecError(f"header claims {h.numel} elements, more than {size} bytes can encode")
        (base,) = struct.unpack_from("<h", sc)
        if not -8 * 160 <= base <= 8 * 127 - 255:
            raise CodecError(f"cachegen scale base {base} out of range")
        bases.append(base)
        codes.append(from_bytes(sc[2:], torch.uint8, blocks * tokens, dev))
        sides.append(sd)
        states.append(from_bytes(st, torch.int32, streams, dev))
        words.extend(wd)
    st_all = torch.stack(states).view(nb * lanes, streams // lanes)
    if not bool((st_all >= rans.L).all()):
        raise CodecError("cachegen rANS state out of range")
    side = torch.stack([bitpack.unpack(s, blocks * channels, width, dev) for s in sides])
    m, dist, valid = model.unfit_channels(side, cmax)
    if not valid:
        raise CodecError("cachegen channel side information out of range")
    dists = dist.view(nb, groups, per, channels).permute(2, 0, 1, 3)
    dists = dists.reshape(per, nb * lanes, streams // lanes)
    syms, ok = rans.decode(words, st_all, dists, tokens, model.TABLES.get(cmax, dev))
    if not ok:
        raise CodecError("cachegen entropy-coded data is corrupt (rANS state check failed)")
    base_t = torch.tensor(bases, dtype=torch.int64, device=dev)
    scale = model.scales_from_codes(base_t, torch.stack(codes)).view(nb, blocks, tokens)
    half = torch.tensor(half_list * e, dtype=torch.float32, device=dev)
    step = scale / half.view(blocks, 1)  # [nb, blocks, tokens]
    off = (m - 2 * cmax).float().view(nb, blocks, channels)
    if allocate is None:
        empty = torch.empty((nb, *header.shape), dtype=header.dtype, device=dev)
        outs = list(empty.unbind(0))
    else:
        outs = [allocate(header.shape, header.dtype) for _ in range(nb)]
    syms = syms.view(per * tokens, nb, streams)
    _dequantize(syms, off, step, groups, outs)
    return outs


def _dequantize(
    syms: torch.Tensor,
    off: torch.Tensor,
    step: torch.Tensor,
    groups: int,
    outs: list[torch.Tensor],
) -> None:
    """(sym + off) * step into each chunk's output, for syms [per * tokens, nb, groups *
    channels], off [nb, blocks, channels], step [nb, blocks, tokens]: with the C kernels on a
    CPU where they could be built, else in torch ops (any device), slice by slice."""
    nb, blocks, tokens = step.shape
    per, channels, dev = blocks // groups, off.shape[-1], syms.device
    lib = cachegen_native.library() if dev.type == "cpu" else None
    if lib is not None:

        def chunk(b: int) -> None:
            cachegen_native.dequantize(lib, syms, off[b], step[b], groups, outs[b], b)

        threads.parallel(chunk, nb, threads.decode_threads())
        return
    off5 = off.view(nb, groups, per, 1, channels)
    step5 = step.view(nb, groups, per, tokens, 1)
    out5 = [out.view(groups, per, tokens, channels) for out in outs]
    syms5 = syms.view(per, tokens, nb, groups, channels)
    for p, g0, g1 in _slices(per, groups, nb * tokens * channels, dev):
        y = syms5[p, :, :, g0:g1].permute(1, 2, 0, 3).to(torch.float32)
        y.add_(off5[:, g0:g1, p])
        y.mul_(step5[:, g0:g1, p])
        for out, y_b in zip(out5, y, strict=True):
            out[g0:g1, p].copy_(y_b)
