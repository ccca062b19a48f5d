"""The `kvtc` channel transform at one step size: weights derived from a calibration, and the
forward and inverse projections of a batch of chunks.

Coefficients are in units of the step: c = ((x - mean) / scale) @ basis.T / step. The
projections are matrix products of [layers, tokens, planes * channels] by the per-layer
bases. Where the device multiplies bfloat16 fast (CUDA from sm80, CPUs with AVX512-BF16 or
AMX), the components whose coefficients can grow large (sqrt(variance) / step > _SPLIT) go in
float32 and the others in bfloat16: their coefficients stay within the integers bfloat16
holds exactly (|q| <= 256) and its output rounding (2**-9 relative) stays a small fraction of
a step. On real MiniLM K/V the fidelity is the same as all-float32 to 5 digits. Everywhere
else it is all float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmc_connector.ops.codecs.calibration import Calibration

# Components whose standard deviation is below step / _ACTIVE are not coded (all but always
# zero: skipping them changes nothing measurable and saves their share of the transform).
_ACTIVE = 8.0
_SPLIT = 10.0


@dataclass(frozen=True)
class Weights:
    """Per-layer transform weights for one device and step, padded to `width` components."""

    active: tuple[int, ...]  # coded components per layer
    width: int
    split: int  # leading components in float32; the rest in `low`
    enc: torch.Tensor  # [layers, dims, width] float32
    bias: torch.Tensor  # [layers, 1, width] float32
    dec: torch.Tensor  # [layers, width, dims] float32
    mean: torch.Tensor  # [layers, 1, dims] float32
    scale: torch.Tensor  # [layers, 1, dims] float32: each plane's RMS, per channel
    enc_low: torch.Tensor | None  # enc[..., split:] as bfloat16
    dec_low: torch.Tensor | None  # dec[:, split:] as bfloat16


def weights(cal: Calibration, device: torch.device, step: float) -> Weights:
    """The weights for `step` on `device`, built once per calibration object."""
    return cal.memo(("weights", str(device), step), lambda: _build(cal, device, step))


def _build(cal: Calibration, device: torch.device, step: float) -> Weights:
    layers, dims = cal.layers, cal.planes * cal.channels
    active = tuple(
        max(1, int((v.sqrt() > step / _ACTIVE).sum())) for v in cal.variance
    )  # variances are sorted: the first `active` components
    width = max(active)
    enc = torch.zeros(layers, dims, width, dtype=torch.float64)
    dec = torch.zeros(layers, width, dims, dtype=torch.float64)
    bias = torch.zeros(layers, 1, width, dtype=torch.float64)
    split = 0
    for layer, (a, basis, var) in enumerate(zip(active, cal.basis, cal.variance, strict=True)):
        u = basis[:a].double()  # [a, dims]
        scale = cal.scale[layer].double().repeat_interleave(cal.channels)  # [dims]
        enc[layer, :, :a] = (u / scale).T / step
        bias[layer, 0, :a] = (cal.mean[layer].double() / scale) @ u.T / step
        dec[layer, :a] = u * scale * step
        split = max(split, int((var[:a].sqrt() / step > _SPLIT).sum()))
    low = _fast_bfloat16(device) and split < width
    return Weights(
        active=active,
        width=width,
        split=split if low else width,
        enc=enc.to(device, torch.float32),
        bias=bias.to(device, torch.float32),
        dec=dec.to(device, torch.float32),
        mean=cal.mean.view(layers, 1, dims).to(device, torch.float32),
        scale=cal.scale.repeat_interleave(cal.channels, 1).view(layers, 1, dims).to(device),
        enc_low=enc[:, :, split:].to(device, torch.bfloat16) if low else None,
        dec_low=dec[:, split:].to(device, torch.bfloat16) if low else None,
    )


def project(x: torch.Tensor, w: Weights) -> torch.Tensor:
    """Coefficients [layers, rows, width] (float32, step units) of x [layers, rows, dims]
    (float32)."""
    if w.enc_low is None:
        return torch.baddbmm(w.bias, x, w.enc, beta=-1)
    top = torch.baddbmm(w.bias[..., : w.split], x, w.enc[..., : w.split], beta=-1)
    low = torch.bmm(x.to(torch.bfloat16), w.enc_low).float()
    low -= w.bias[..., w.split :]
    return torch.cat([top, low], -1)


def reconstruct(c: torch.Tensor, w: Weights) -> torch.Tensor:
    """x [layers, rows, dims] (float32) from coefficients [layers, rows, width] (step units)."""
    if w.dec_low is None:
        return torch.baddbmm(w.mean, c, w.dec)
    x = torch.baddbmm(w.mean, c[..., : w.split], w.dec[:, : w.split])
    x += torch.bmm(c[..., w.split :].to(torch.bfloat16), w.dec_low)
    return x


def _fast_bfloat16(device: torch.device) -> bool:
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        cpu = torch.cpu
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)
    return False
