"""The `kvtc` channel transform at one step size: weights derived from a calibration, and the
forward and inverse projections of a batch of chunks.

Coefficients are in units of the step: c = ((x - mean) / scale) @ basis.T / step. The
projections are matrix products of [layers, tokens, planes * channels] by the per-layer
bases. Where the device multiplies bfloat16 fast (CUDA from sm80, CPUs with AVX512-BF16 or
AMX), the components whose coefficients can grow large (sqrt(variance) / step > _SPLIT) go in
float32 and the others in bfloat16: their coefficients stay within the integers bfloat16
holds exactly (|q| <= 256) and its output rounding (2**-9 relative) stays a small fraction of
a step. On CPUs with VNNI the inverse of those components is an int8 product instead (their
quantized coefficients are small integers; the weights are int8 with one scale per output
channel, ~0.4% relative error), twice as fast as bfloat16 there. Rows where an outlier
pushes those components past what the low precision holds to a fraction of a step (|c| > 64
steps forward, |q| > 128 back) are redone in float32. On real MiniLM K/V the fidelity is the
same as all-float32 to 4 digits. Everywhere else it is all float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmc_connector.ops.codecs.calibration import Calibration

# Components whose standard deviation is below step / _ACTIVE are not coded (all but always
# zero: skipping them changes nothing measurable and saves their share of the transform).
_ACTIVE = 8.0
_SPLIT = 10.0
# bfloat16 products are kept for coefficients up to this many steps (output rounding 1/8 step).
_EXACT = 64.0


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
    dec_low: torch.Tensor | None  # dec[:, split:] as bfloat16, or as int8 times dec_scale
    dec_scale: torch.Tensor | None  # [layers, 1, dims] float32 when dec_low is int8
    late: torch.Tensor  # [sum(active)] bool, CPU: the coded components past `split`


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
    dec_low, dec_scale = None, None
    if low and _fast_int8(device):
        rest = dec[:, split:]
        dec_scale = rest.abs().amax(1, keepdim=True).clamp_min(1e-30) / 127
        dec_low = torch.round(rest / dec_scale).to(device, torch.int8)
        dec_scale = dec_scale.to(device, torch.float32)
    elif low:
        dec_low = dec[:, split:].to(device, torch.bfloat16)
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
        dec_low=dec_low,
        dec_scale=dec_scale,
        late=torch.cat([torch.arange(a) >= (split if low else width) for a in active]),
    )


def project(x: torch.Tensor, w: Weights) -> torch.Tensor:
    """Coefficients [layers, rows, width] (float32, step units) of x [layers, rows, dims]
    (float32)."""
    if w.enc_low is None:
        return torch.baddbmm(w.bias, x, w.enc, beta=-1)
    top = torch.baddbmm(w.bias[..., : w.split], x, w.enc[..., : w.split], beta=-1)
    low = torch.bmm(x.to(torch.bfloat16), w.enc_low).float()
    low -= w.bias[..., w.split :]
    c = torch.cat([top, low], -1)
    # Outlier rows (heavy tails) can push the bfloat16 components past _EXACT: redo them.
    rows = torch.nonzero(low.abs().amax(-1).amax(0) > _EXACT).flatten()
    if rows.numel():
        c[:, rows] = torch.baddbmm(w.bias, x[:, rows], w.enc, beta=-1)
    return c


def reconstruct(c: torch.Tensor, w: Weights, wide: torch.Tensor) -> torch.Tensor:
    """x [layers, rows, dims] (float32) from coefficients [layers, rows, width] (step units).
    `wide`: the rows whose components past `split` may leave [-128, 127] (neither int8 nor
    bfloat16 products hold them to a fraction of a step): redone in float32."""
    if w.dec_low is None:
        return torch.baddbmm(w.mean, c, w.dec)
    x = torch.baddbmm(w.mean, c[..., : w.split], w.dec[:, : w.split])
    rest = c[..., w.split :]
    if w.dec_scale is None:
        x += torch.bmm(rest.to(torch.bfloat16), w.dec_low)
    else:
        ints = rest.to(torch.int8)
        products = [torch._int_mm(ints[i], w.dec_low[i]) for i in range(len(ints))]
        x.addcmul_(torch.stack(products).float(), w.dec_scale)
    if wide.numel():
        x[:, wide] = torch.baddbmm(w.mean, c[:, wide], w.dec)
    return x


def _fast_int8(device: torch.device) -> bool:
    """CPUs with VNNI: int8 products via torch._int_mm (checked to exist and be exact)."""
    if device.type != "cpu" or not bool(getattr(torch.cpu, "_is_vnni_supported", lambda: False)()):
        return False
    a = torch.arange(-32, 32, dtype=torch.int8).view(2, 32)
    try:
        return bool(torch.equal(torch._int_mm(a, a.T.contiguous()), a.int() @ a.T.int()))
    except (AttributeError, RuntimeError):
        return False


def _fast_bfloat16(device: torch.device) -> bool:
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        cpu = torch.cpu
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)
    return False
