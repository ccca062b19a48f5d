"""The `kvtc` entropy model, attention-sink detection and stream layout, as whole-tensor ops.

Symbols: each quantized coefficient q of a component is split into hi = q >> k (entropy coded,
in [-32, 31]) and its k low bits (stored raw: for a component wide enough to need k > 0 they
are nearly uniform). k is the smallest shift that fits the component's largest |q| in the
chunk. hi follows a discretized Laplace distribution centred on 0 (k = 0) or -0.5 (k > 0,
since the shift rounds down) with a scale fitted per chunk and component on a quarter-octave
grid: 9 bits of side information per component (5 for the scale, 4 for k), and a fixed
family of tables, so no tables travel with the data.
"""

from __future__ import annotations

import math
import threading

import torch

from lmc_connector.ops.codecs import rans

ALPHABET = 64
HALF = ALPHABET // 2
K_BITS = 4
MAX_K = (1 << K_BITS) - 1
SIGMA_BITS = 5
N_SIGMA = 1 << SIGMA_BITS
SIGMA0 = 0.1
SIDE_BITS = SIGMA_BITS + K_BITS
QMAX = HALF << MAX_K  # |q| is clamped below this
_THRESHOLDS = HALF * torch.exp2(torch.arange(MAX_K, dtype=torch.float32))


class _TableCache:
    """The family's rANS tables, built once per device."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tables: dict[str, rans.RansTables] = {}

    def get(self, device: torch.device) -> rans.RansTables:
        with self._lock:
            if "cpu" not in self._tables:
                self._tables["cpu"] = rans.build_tables(_family())
            if str(device) not in self._tables:
                self._tables[str(device)] = self._tables["cpu"].to(device)
            return self._tables[str(device)]


TABLES = _TableCache()


def _family() -> torch.Tensor:
    """Probabilities [N_SIGMA * 2, ALPHABET]: Laplace (scale sigma / sqrt 2) over hi = -32..31,
    distribution index = sigma code * 2 + (centred on -0.5)."""
    sigma = SIGMA0 * torch.exp2(torch.arange(N_SIGMA, dtype=torch.float64) / 4)
    b = (sigma / math.sqrt(2))[:, None, None]
    center = torch.tensor([0.0, -0.5], dtype=torch.float64)[None, :, None]
    v = torch.arange(ALPHABET, dtype=torch.float64) - HALF

    def cdf(z: torch.Tensor) -> torch.Tensor:
        return torch.where(z < 0, 0.5 * torch.exp(z / b), 1 - 0.5 * torch.exp(-z / b))

    p = cdf(v + 0.5 - center) - cdf(v - 0.5 - center)
    return p.reshape(N_SIGMA * 2, ALPHABET)


def fit_components(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """For integer-valued q [layers, chunks, tokens, width] (float32): per (layer, chunk,
    component) the shift k (float32) and the side code (int32: sigma code | k << SIGMA_BITS),
    and whether q was all finite (NaN passes round and clamp).
    The scale is that of hi = floor(q / 2**k): E[hi**2] when k = 0, about
    E[q**2] / 4**k + 1/12 around -0.5 otherwise (the encoder's model choice; the decoder only
    reads the code)."""
    top = torch.maximum(q.amax(2) + 1, q.amin(2).neg_())
    k = (top.unsqueeze(-1) > _THRESHOLDS.to(q.device)).sum(-1).float()
    mean_square = (q * q).sum(2).div_(q.shape[2])  # vector_norm over dim 2: ~8x slower on CPU
    var = mean_square * torch.exp2(-2 * k) + (k > 0).float() / 12
    sigma = var.sqrt_().clamp_min_(SIGMA0)
    code = torch.round(4 * torch.log2(sigma / SIGMA0)).clamp_(0, N_SIGMA - 1).to(torch.int32)
    return k, code | (k.to(torch.int32) << SIGMA_BITS), bool(torch.isfinite(top).all())


def unpack_side(side: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, distribution index) from side codes."""
    k = side >> SIGMA_BITS
    return k, (side & (N_SIGMA - 1)) * 2 + (k > 0).to(side.dtype)
