"""Fitting a `kvtc` calibration: per layer, one channel transform over K and V together.

K and V of a layer are both linear maps of the same hidden state, so their joint vector
[K, V] (planes * channels values per token) is strongly correlated across the two planes: in
an MHA model with as many K channels as hidden units it spans only half its dimensions. The
fit takes, per layer:

* scale: each plane's RMS around its mean, so K and V weigh the same in the transform (the
  codec's step is relative to it);
* mean and the principal components of the scaled joint vectors (eigenvectors of their
  covariance, in float64), kept while they hold more than `1 - energy` of the variance;
* each kept component's variance: the bit allocation. At a step Δ the codec codes component
  i with about log2(sqrt(variance_i) / Δ) + 2 bits and skips those far below Δ (reverse
  water-filling: with entropy coding one step for all components is MSE-optimal).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmc_connector.ops.codecs import format as fmt
from lmc_connector.ops.codecs.calibration import MAX_DIMS, MAX_LAYERS, serialize
from lmc_connector.ops.codecs.registry import codec_id

DEFAULT_ENERGY = 1 - 1e-6


def fit(samples: Sequence[torch.Tensor], energy: float = DEFAULT_ENERGY) -> bytes:
    """The calibration blob of sample chunks [planes, layers, tokens, channels] (any float
    dtype, any device, tokens may differ); needs at least planes * channels tokens in all."""
    planes, layers, channels = _check(samples)
    if not 0.5 <= energy < 1:
        raise ValueError(f"energy must be in [0.5, 1), got {energy}")
    dims = planes * channels
    tokens = sum(int(s.shape[2]) for s in samples)
    if tokens < dims:
        raise ValueError(
            f"calibrating [{planes}, {layers}, *, {channels}] chunks needs at least {dims} "
            f"tokens of samples, got {tokens}: pass more cached chunks"
        )
    dev = samples[0].device
    scale = torch.empty(layers, planes, dtype=torch.float64, device=dev)
    mean = torch.empty(layers, dims, dtype=torch.float64, device=dev)
    variance, basis = [], []
    for layer in range(layers):
        # [tokens, planes, channels] -> [tokens, dims]; sums in float64, products in float32
        x = torch.cat([s[:, layer].to(dev, torch.float64).transpose(0, 1) for s in samples])
        x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        mu = x.mean(0)
        x -= mu
        rms = x.square().mean((0, 2)).sqrt()
        rms = torch.where(rms > 0, rms, torch.ones_like(rms))
        x /= rms.view(1, planes, 1)
        x32 = x.reshape(tokens, dims).float()
        ev, vec = torch.linalg.eigh((x32.T @ x32).double() / tokens)
        ev, vec = ev.flip(0).clamp_min(0), vec.flip(1)
        kept = ev.cumsum(0) < energy * ev.sum()
        rank = max(1, min(dims, int(kept.sum()) + 1))
        scale[layer], mean[layer] = rms, mu.reshape(dims)
        variance.append(ev[:rank])
        basis.append(vec[:, :rank].T)
    return serialize(
        codec_id("kvtc"), (planes, layers, channels), tokens, scale, mean, variance, basis
    )


def _check(samples: Sequence[torch.Tensor]) -> tuple[int, int, int]:
    if isinstance(samples, torch.Tensor) or not samples:
        raise ValueError("samples must be a non-empty list of KV chunks")
    for s in samples:
        fmt.check_kv(s)
    planes, layers, _tokens, channels = samples[0].shape
    for s in samples:
        if (s.shape[0], s.shape[1], s.shape[3]) != (planes, layers, channels):
            raise ValueError(
                f"samples differ in layout: {list(samples[0].shape)} and {list(s.shape)} "
                "(planes, layers and channels must match; tokens may differ)"
            )
    if layers > MAX_LAYERS or planes * channels > MAX_DIMS:
        raise ValueError(f"layout [{planes}, {layers}, *, {channels}] is too large to calibrate")
    return planes, layers, channels
