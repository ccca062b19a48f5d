"""How `kvtc` lays its symbols out: coefficients by layer <-> by token, and streams for the
rANS coder.

The transform works layer-major ([layers, chunks * tokens, width]); the coder wants
token-major symbols [chunks, tokens, components] (components of all layers in a row, only the
coded ones). Stream s of a chunk codes components s, s + S, s + 2S, ... (`per_stream` of them,
so that a stream runs at least MIN_STEPS steps and its 4-byte final state costs little), each
over all tokens; missing components are padding symbols. The S streams are split into `lanes`
equal runs that the coder handles independently (in parallel on a CPU). Both reshapes are
copies of contiguous rows, no element-wise transposes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lmc_connector.ops.codecs import kvtc_model as model
from lmc_connector.ops.codecs import rans
from lmc_connector.ops.codecs.errors import CodecError

MIN_STEPS = 512
MAX_LANES = 4
_LANE_STREAMS = 64  # fewest streams per lane


def gather(
    t: torch.Tensor, active: Sequence[int], nb: int, tokens: int, dtype: torch.dtype
) -> torch.Tensor:
    """Token-major [chunks, tokens, components] (as `dtype`) of the coded components of the
    layer-major t [layers, chunks * tokens, width]."""
    out = torch.empty(nb, tokens, sum(active), dtype=dtype, device=t.device)
    at = 0
    for layer, a in enumerate(active):
        out[:, :, at : at + a] = t[layer, :, :a].view(nb, tokens, a)
        at += a
    return out


def scatter(q: torch.Tensor, active: Sequence[int], width: int) -> torch.Tensor:
    """Inverse of `gather`: float32 [layers, chunks * tokens, width] (zeros where no
    component is coded) from q [chunks, tokens, components]."""
    nb, tokens, _ = q.shape
    out = torch.zeros(len(active), nb * tokens, width, dtype=torch.float32, device=q.device)
    at = 0
    for layer, a in enumerate(active):
        out[layer, :, :a].view(nb, tokens, a).copy_(q[:, :, at : at + a])
        at += a
    return out


def layout(components: int, tokens: int, lanes: int | None = None) -> tuple[int, int, int]:
    """(components per stream, streams, lanes) for a chunk; `lanes` None: the encoder's
    choice (up to MAX_LANES of at least _LANE_STREAMS streams)."""
    per_stream = max(1, -(-MIN_STEPS // tokens))
    streams = -(-components // per_stream)
    if lanes is None:
        lanes = max(1, min(MAX_LANES, streams // _LANE_STREAMS))
    return per_stream, -(-streams // lanes) * lanes, lanes


def encode_codes(codes: torch.Tensor) -> tuple[int, list[tuple[bytes, bytes]]]:
    """Code codes [chunks, tokens, components] (int16: distribution * ALPHABET + symbol):
    the lanes and, per chunk and lane, (words, final states)."""
    nb, tokens, comps = codes.shape
    per_stream, streams, lanes = layout(comps, tokens)
    padded = torch.full(
        (nb, tokens, per_stream * streams), model.HALF, dtype=torch.int16, device=codes.device
    )
    padded[:, :, :comps] = codes
    runs = padded.view(nb, tokens, per_stream, streams).permute(2, 1, 0, 3).contiguous()
    runs = runs.view(per_stream * tokens, nb * lanes, streams // lanes)
    return lanes, rans.encode(runs, model.TABLES.get(codes.device))


def decode_codes(
    sections: Sequence[Sequence[memoryview]], dist: torch.Tensor, tokens: int, lanes: int
) -> torch.Tensor:
    """Inverse of `encode_codes`: symbols [chunks, tokens, components] (uint8, 0..63) from
    each chunk's [states, lane words...] sections and the distributions dist [chunks,
    components]."""
    nb, comps = dist.shape
    if not 1 <= lanes <= MAX_LANES:
        raise CodecError(f"kvtc blob claims {lanes} lanes")
    per_stream, streams, _ = layout(comps, tokens, lanes)
    words: list[memoryview] = []
    states = []
    for chunk in sections:
        st, *wd = chunk
        if len(st) != 4 * streams or any(len(w) % 2 for w in wd):
            raise CodecError(f"kvtc rANS sections of {[len(s) for s in chunk]} bytes do not fit "
                             f"{streams} streams")  # fmt: skip
        total = sum(len(w) for w in wd) // 2
        if streams * per_stream * tokens > rans.SYMBOLS_PER_WORD_BOUND * (total + streams):
            raise CodecError(f"kvtc blob claims more symbols than {2 * total} bytes can encode")
        states.append(np.frombuffer(st, dtype="<u4").astype(np.int64))
        words.extend(wd)
    st_all = torch.from_numpy(np.stack(states))
    if not bool(((st_all >= rans.L) & (st_all < 1 << 31)).all()):
        raise CodecError("kvtc rANS state out of range")
    dev = dist.device
    dists = torch.zeros(nb, per_stream * streams, dtype=torch.int32, device=dev)
    dists[:, :comps] = dist
    dists = dists.view(nb, per_stream, streams).transpose(0, 1).contiguous()
    dists = dists.view(per_stream, nb * lanes, streams // lanes)
    st_dev = st_all.to(device=dev, dtype=torch.int32).view(nb * lanes, streams // lanes)
    syms, ok = rans.decode(words, st_dev, dists, tokens, model.TABLES.get(dev))
    if not ok:
        raise CodecError("kvtc entropy-coded data is corrupt (rANS state check failed)")
    syms = syms.view(per_stream, tokens, nb, streams).permute(2, 1, 0, 3)
    return syms.reshape(nb, tokens, per_stream * streams)[:, :, :comps]
