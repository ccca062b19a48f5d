"""Fitting a calibration inside the worker, on chunks it has cached (`POST /calibrate`).

Which chunks: those the local tiers hold (CPU memory, then disk), plain ones first (encoded
ones only when the plain ones are too few; they are decoded first), spread evenly over the
tiers' recency order so that many prompts contribute rather than the latest few, until
SAMPLE_TOKENS_PER_DIM tokens per dimension of the joint K/V vector (planes x channels) or
MAX_SAMPLE_BYTES of plain KV, whichever is less. The fit needs at least one token per
dimension; fewer cached tokens refuse the calibration at once (`NotEnoughKVError`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from lmc_connector.cache.calibrations import CalibrationBook, calibrated_methods
from lmc_connector.cache.decode import decoded_prefix
from lmc_connector.cache.errors import NotEnoughKVError
from lmc_connector.cache.layout import ChunkLayout
from lmc_connector.cache.tiers import Tier, TierContext
from lmc_connector.operations import JobOutcome
from lmc_connector.tokens import ChunkKey

logger = logging.getLogger(__name__)

#: Sample tokens per dimension of the joint K/V vector: the covariance of D dimensions is
#: well estimated from a few times D samples (16x for a 768-dimension model measured as
#: good as 64x in benchmarks/codec_quality.py).
SAMPLE_TOKENS_PER_DIM = 16
#: Plain KV sampled at most (the fit holds it, and one layer of it in float64, at once).
MAX_SAMPLE_BYTES = 512 << 20


@dataclass(slots=True)
class CalibrationJob:
    """One calibration of `method` on sample chunks (each with the tier it was chosen in);
    the samples are pinned until it ran. `outcome` fills in as it runs."""

    method: str
    samples: list[tuple[Tier, ChunkKey]]
    pinned: bool = True
    outcome: JobOutcome = field(default_factory=JobOutcome)

    @property
    def keys(self) -> list[ChunkKey]:
        return [key for _, key in self.samples]


@dataclass(frozen=True, slots=True)
class _Candidate:
    tier: Tier
    key: ChunkKey
    tokens: int
    plain: bool


def needed_tokens(layout: ChunkLayout) -> int:
    """Tokens the fit needs at least: one per dimension of the joint K/V vector."""
    return layout.planes * layout.channels


def schedule(
    method: str, tiers: list[Tier], ctx: TierContext, layout: ChunkLayout
) -> CalibrationJob:
    """Choose and pin the samples of a calibration of `method` (see the module docstring).

    Raises ValueError for a method that takes no calibration and `NotEnoughKVError` when
    the tiers hold fewer tokens than the fit needs.
    """
    valid = calibrated_methods()
    if method not in valid:
        raise ValueError(
            f"{method} takes no calibration; methods that do: {', '.join(valid) or 'none'}"
        )
    candidates = _candidates(tiers)
    needed = needed_tokens(layout)
    held = sum(c.tokens for c in candidates)
    if held < needed:
        raise NotEnoughKVError(method, needed, held)
    budget = max(needed, min(SAMPLE_TOKENS_PER_DIM * needed, MAX_SAMPLE_BYTES // layout.nbytes(1)))
    chosen = _spread([c for c in candidates if c.plain], budget)
    short = budget - sum(c.tokens for c in chosen)
    if short > 0:
        chosen += _spread([c for c in candidates if not c.plain], short)
    with ctx.lock:
        kept = [c for c in chosen if c.tier.held([c.key])[0]]
        ctx.pin(c.key for c in kept)
    job = CalibrationJob(method, [(c.tier, c.key) for c in kept])
    job.outcome.num_tokens = sum(c.tokens for c in kept)
    return job


def _candidates(tiers: list[Tier]) -> list[_Candidate]:
    """Every chunk the tiers hold, each once (in the nearest tier holding it)."""
    seen: set[ChunkKey] = set()
    out: list[_Candidate] = []
    for tier in tiers:
        keys = [k for k in tier.chunk_keys() if k not in seen]
        for key, form in zip(keys, tier.forms(keys), strict=True):
            if form is not None:
                out.append(_Candidate(tier, key, form.num_tokens, form.method is None))
                seen.add(key)
    return out


def _spread(candidates: list[_Candidate], budget: int) -> list[_Candidate]:
    """About `budget` tokens of `candidates`, taken at even strides through the list."""
    total = sum(c.tokens for c in candidates)
    if total <= budget:
        return list(candidates)
    count = max(1, round(len(candidates) * budget / total))
    picked = {i * len(candidates) // count for i in range(count)}
    chosen = [candidates[i] for i in sorted(picked)]
    rest = (c for i, c in enumerate(candidates) if i not in picked)
    tokens = sum(c.tokens for c in chosen)
    for extra in rest:
        if tokens >= budget:
            break
        chosen.append(extra)
        tokens += extra.tokens
    return chosen


def run(
    job: CalibrationJob, book: CalibrationBook, device: torch.device, layout: ChunkLayout
) -> CalibrationJob:
    """Load and decode the samples on `device`, fit, and adopt the calibration (kept in
    memory and on every shelf); fills `job.outcome`. Raises ValueError when too few samples
    are left (removed meanwhile) or the fit fails. The caller releases the pins."""
    from lmc_connector.ops.codecs import fit_calibration

    start = time.perf_counter()
    outcome = job.outcome
    samples: list[torch.Tensor] = []
    for tier, key in job.samples:
        _, chunk = tier.load(key)
        if chunk is None:
            continue
        decoded, error = decoded_prefix([chunk], device, book.store)
        if error is not None:
            logger.warning("calibration sample %016x skipped: %s", key, error)
            continue
        samples += decoded
        outcome.bytes_before += layout.nbytes(chunk.num_tokens)
    tokens = sum(int(s.shape[2]) for s in samples)
    if tokens < needed_tokens(layout):
        raise NotEnoughKVError(job.method, needed_tokens(layout), tokens)
    blob = fit_calibration(job.method, samples)
    calibration = book.adopt(job.method, blob)
    outcome.num_tokens, outcome.chunks_done = tokens, len(samples)
    outcome.bytes_after = len(blob)
    outcome.calibration_id = calibration.id
    outcome.seconds = time.perf_counter() - start
    logger.info(
        "calibrated %s on %d chunks (%d tokens, %.1f MB of KV) in %.2f s (%.0f tokens/s): "
        "calibration %s, %.1f MB",
        job.method,
        len(samples),
        tokens,
        outcome.bytes_before / 1e6,
        outcome.seconds,
        tokens / max(outcome.seconds, 1e-9),
        calibration.id,
        len(blob) / 1e6,
    )
    return job
