"""CacheGen's quantizer and the per-channel distribution model, as whole-tensor torch ops.

Quantization (as in CacheGen / LMCache): one absmax scale per (K/V, layer, token), q in
[-C_l, C_l] with more levels (larger C_l) for the first layer group. Scales are stored as
8-bit log2 codes (1/8 octave) above a per-chunk base, rounded up so |x| <= scale.

Entropy model: the symbols of one (K/V, layer, channel) over the chunk's tokens follow a
discretized Gaussian fitted per chunk. Its side information is 12 bits per channel (mean in
quarter steps, sigma on a quarter-octave grid) instead of a 16-bit CDF per symbol value. The
coder sees r = q - round(mean), drawn from one of a fixed family of FAMILY tables (sigma x
fractional mean) built once per alphabet, so no tables travel with the data.
"""

from __future__ import annotations

import math
import threading

import torch

from lmc_connector.ops.codecs import rans

SIGMA0 = 0.1
N_SIGMA = 32
N_FRAC = 4
FAMILY = N_SIGMA * N_FRAC
SIGMA_BITS = 5
SCALE_STEPS = 8  # scale codes per octave


def default_layer_levels(layers: int, levels: tuple[int, ...]) -> list[int]:
    """Half-level count C per layer: `levels` (odd level counts) spread over equal layer groups,
    the CacheGen split scaled to the model (first group most precise)."""
    groups = len(levels)
    return [(levels[min(i * groups // layers, groups - 1)] - 1) // 2 for i in range(layers)]


def alphabet(cmax: int) -> int:
    return 4 * cmax + 1


def side_width(cmax: int) -> int:
    return math.ceil(math.log2(8 * cmax + 1)) + SIGMA_BITS


class _TableCache:
    """rANS tables of the distribution family, built once per (alphabet, device)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tables: dict[tuple[int, str], rans.RansTables] = {}

    def get(self, cmax: int, device: torch.device) -> rans.RansTables:
        key = (cmax, str(device))
        with self._lock:
            if key not in self._tables:
                cpu = self._tables.get((cmax, "cpu")) or rans.build_tables(_family(cmax))
                self._tables[(cmax, "cpu")] = cpu
                self._tables[key] = cpu.to(device)
            return self._tables[key]


TABLES = _TableCache()


def _family(cmax: int) -> torch.Tensor:
    """Probabilities [FAMILY, alphabet]: discretized Gaussians over residuals -2C..2C."""
    sigma = SIGMA0 * torch.exp2(torch.arange(N_SIGMA, dtype=torch.float64) / 4)
    center = (torch.arange(N_FRAC, dtype=torch.float64) - N_FRAC // 2) / N_FRAC
    v = torch.arange(alphabet(cmax), dtype=torch.float64) - 2 * cmax
    z = v[None, None, :] - center[None, :, None]
    s = sigma[:, None, None] * math.sqrt(2)
    p = 0.5 * (torch.erf((z + 0.5) / s) - torch.erf((z - 0.5) / s))
    return p.reshape(FAMILY, -1)


def scale_codes(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-chunk int64 base [nb] and uint8 codes for amax [nb, rows]; 2^((code+base)/8) >= amax."""
    lg = torch.ceil(SCALE_STEPS * torch.log2(amax))
    finite = torch.isfinite(lg)
    top = torch.where(finite, lg, torch.full_like(lg, -1e9)).amax(1)
    top = torch.where(top < -1e8, torch.zeros_like(top), top)
    base = (top - 255).long()
    codes = torch.where(finite, lg - base[:, None], torch.zeros_like(lg)).clamp(0, 255)
    return base, codes.to(torch.uint8)


def scales_from_codes(base: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return torch.exp2((codes.float() + base[:, None].float()) / SCALE_STEPS)


def fit_channels(
    s1: torch.Tensor, s2: torch.Tensor, count: int, half: torch.Tensor, cmax: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From per-channel sums of q and q**2 over `count` tokens (float, [..., channels]) and C
    per block `half` (broadcastable, [..., 1]): the integer center m, distribution index and
    side-info code. Sums instead of mean/std: one cheap pass over q, done slice by slice."""
    mu = s1 / count
    sigma = (s2 / count - mu * mu).clamp_min(0).sqrt()
    lim = (4 * half).to(s1.dtype)
    mu4 = torch.maximum(torch.minimum(torch.round(4 * mu), lim), -lim)
    m = torch.floor((mu4 + 2) / 4)
    frac = mu4 - 4 * m
    k = torch.round(4 * torch.log2(sigma.clamp_min(1e-3) / SIGMA0)).clamp(0, N_SIGMA - 1)
    dist = (k * N_FRAC + frac + N_FRAC // 2).long()
    side = ((mu4 + 4 * cmax).long() << SIGMA_BITS) | k.long()
    return m, dist, side


def unfit_channels(side: torch.Tensor, cmax: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Inverse of the side-info code: (m, dist, valid)."""
    k = side & (N_SIGMA - 1)
    mu4 = (side >> SIGMA_BITS) - 4 * cmax
    valid = bool((mu4.abs() <= 4 * cmax).all())
    m = torch.div(mu4 + 2, 4, rounding_mode="floor")
    frac = mu4 - 4 * m
    return m, k * N_FRAC + frac + N_FRAC // 2, valid
