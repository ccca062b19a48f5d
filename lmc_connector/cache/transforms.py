"""Compress and decompress chunks in place, in the background.

A job pins its chunks when scheduled, codes them in batches outside the
cache lock on the codec device, then swaps each chunk only if nobody
replaced it meanwhile. A load racing a job sees the old or the new chunk,
never a half state; a failed encode leaves the old chunk where it was.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lmc_connector.cache.calibrate import CalibrationJob
from lmc_connector.cache.calibrations import CalibrationBook
from lmc_connector.cache.chunk import Chunk
from lmc_connector.cache.decode import to_tensors
from lmc_connector.cache.errors import NotCalibratedError, StoredMethodError
from lmc_connector.cache.tiers import Tier, TierContext
from lmc_connector.config import CacheConfig
from lmc_connector.operations import JobOutcome, TransformKind
from lmc_connector.tokens import ChunkKey

if TYPE_CHECKING:
    from lmc_connector.ops.codecs import Codec

logger = logging.getLogger(__name__)

#: Chunks coded per codec call: enough to keep a GPU busy, bounded so memory stays flat.
BATCH_CHUNKS = 8
#: Distinct problems warned about once each (then only the first of each kind is logged).
MAX_WARNED = 1024
#: Distinct errors one job reports at most.
MAX_ERRORS = 16


@dataclass(slots=True)
class TransformJob:
    """One compress or decompress over the chunks of one tier; `outcome` fills in as it runs."""

    kind: TransformKind
    method: str
    tier: Tier
    keys: list[ChunkKey]
    #: Whether scheduling pinned `keys` (not in a shared store: nothing to pin there).
    pinned: bool = True
    outcome: JobOutcome = field(default_factory=JobOutcome)


def _wanted(job: TransformJob, chunk: Chunk) -> bool:
    """Whether the job codes `chunk`: plain ones for a compress, ones encoded with the job's
    method for a decompress (others are left as they are and counted as skipped)."""
    if job.kind == "compress":
        return not chunk.encoded
    return chunk.method == job.method


class TransformRunner:
    """Schedules and runs transform jobs over the tiers of one engine, and encodes for the
    tiers (compress_before_evict, the shared store's serde).

    Holds its codec device and the engine's calibrations (a calibrated codec encodes with
    the current one of its method, and every chunk decodes with the one it names); besides
    the methods it already warned about, no state: any thread may schedule and encode, and
    the control agent's jobs thread runs jobs one at a time.
    """

    def __init__(
        self, ctx: TierContext, device: torch.device, calibrations: CalibrationBook
    ) -> None:
        self._ctx = ctx
        self.device = device
        self.calibrations = calibrations
        self._warned: set[tuple[str, str]] = set()

    def codec(self, method: str) -> Codec:
        """The codec of `method`, with its current calibration if it needs one
        (`NotCalibratedError` before there is one; `UnknownCodecError` for no codec)."""
        from lmc_connector.ops.codecs import get_codec, is_calibrated

        if not is_calibrated(method):
            return get_codec(method)
        calibration = self.calibrations.current(method)
        if calibration is None:
            raise NotCalibratedError(method)
        return get_codec(method, calibration=calibration)

    def schedule(
        self,
        kind: TransformKind,
        tier: Tier,
        keys: list[ChunkKey],
        method: str,
        prefix: bool = True,
    ) -> TransformJob:
        """Validate `method` against the codecs and what is stored, then pin the chunks the
        job will code until it ran: the cached prefix of `keys`, or (`prefix=False`) every
        one of them held in `tier`.

        A decompress whose method none of the encoded chunks was stored with raises
        `StoredMethodError` naming what is stored; a compress with a calibrated codec
        before its calibration exists, `NotCalibratedError`. Without `prefix`, the job's
        `num_tokens` is the tokens of the chunks it covers.
        """
        from lmc_connector.ops.codecs import is_calibrated

        if kind == "compress" or not is_calibrated(method):  # is_calibrated: the name exists
            self.codec(method)
        forms = tier.forms(keys)
        if prefix:
            hits = next((i for i, f in enumerate(forms) if f is None), len(forms))
            covered = list(zip(keys[:hits], forms[:hits], strict=True))
        else:
            covered = [(k, f) for k, f in zip(keys, forms, strict=True) if f is not None]
        if kind == "decompress":
            stored = Counter(f.method for _, f in covered if f is not None and f.method)
            if stored and method not in stored:
                raise StoredMethodError(method, tier.name, dict(stored))
        if tier.answers_from_memory:
            with self._ctx.lock:
                still = tier.held([k for k, _ in covered])
                if prefix:
                    still = still[: still.index(False)] if False in still else still
                kept = [(k, f) for (k, f), held in zip(covered, still, strict=False) if held]
                self._ctx.pin([k for k, _ in kept])
            job = TransformJob(kind, method, tier, [k for k, _ in kept])
        else:  # a shared store: its forms were just read from it, and pins do not reach it
            kept = covered
            job = TransformJob(kind, method, tier, [k for k, _ in kept], pinned=False)
        if not prefix:
            job.outcome.num_tokens = sum(f.num_tokens for _, f in kept if f is not None)
        return job

    def release(self, job: TransformJob | CalibrationJob) -> None:
        """Drop the pins of a job (one that will not run, or one that ran)."""
        if job.pinned:
            self._ctx.unpin(job.keys)

    def run(self, job: TransformJob) -> TransformJob:
        start = time.perf_counter()
        try:
            for i in range(0, len(job.keys), BATCH_CHUNKS):
                self._run_batch(job, job.keys[i : i + BATCH_CHUNKS])
        finally:
            self.release(job)
            job.outcome.seconds = time.perf_counter() - start
        return job

    def _run_batch(self, job: TransformJob, keys: list[ChunkKey]) -> None:
        tier, outcome = job.tier, job.outcome
        loaded = [(key, *tier.load(key)) for key in keys]
        todo = [
            (key, marker, chunk)
            for key, marker, chunk in loaded
            if chunk is not None and _wanted(job, chunk)
        ]
        outcome.chunks_skipped += len(keys) - len(todo)
        try:
            fresh = self._code(job, [chunk for _, _, chunk in todo])
        except (ValueError, RuntimeError) as e:
            logger.exception("%s with %s failed; chunks left as they were", job.kind, job.method)
            _note(outcome, f"{job.kind} failed: {e}")
            return
        for (key, marker, old), new in zip(todo, fresh, strict=True):
            swapped = tier.replace(key, marker, new)
            if swapped is None:
                outcome.chunks_skipped += 1
            elif swapped:
                outcome.chunks_done += 1
                outcome.bytes_before += old.nbytes
                outcome.bytes_after += new.nbytes
            else:
                _note(outcome, f"no room in {tier.name} for {job.kind}ed chunks")

    def encode(self, method: str, chunks: list[Chunk]) -> list[Chunk]:
        """Plain chunks encoded with `method` on the codec device (any thread)."""
        codec = self.codec(method)
        kvs = [c.kv.to(self.device) for c in chunks if c.kv is not None]
        blobs = codec.encode_batch(kvs)
        return [
            Chunk(c.num_tokens, blob=b, method=method) for c, b in zip(chunks, blobs, strict=True)
        ]

    def encode_to_evict(self, method: str, chunks: list[Chunk]) -> list[Chunk]:
        """`encode` for compress_before_evict: before `method` has a calibration this raises
        `NotCalibratedError` (the tier then evicts as usual), saying why once."""
        try:
            return self.encode(method, chunks)
        except NotCalibratedError as e:
            self._warn_once(method, "compress_before_evict", "compresses nothing", e)
            raise

    def encode_for_store(self, method: str, chunks: list[Chunk]) -> list[Chunk]:
        """`encode` for the shared store's serde: before `method` has a calibration the
        chunks stay plain (every value says how it is stored), saying why once."""
        try:
            encoded = self.encode(method, chunks)
        except NotCalibratedError as e:
            self._warn_once(method, "remote_serde", "uploads plain chunks", e)
            return chunks
        self.calibrations.keep_on_shelves(method)
        return encoded

    def _warn_once(self, method: str, key: str, doing: str, error: Exception) -> None:
        if (method, key) in self._warned:
            return
        self._warned.add((method, key))
        logger.warning("%s: %s: it %s until a calibration exists (%s)", key, method, doing, error)

    def undecodable(self, key: ChunkKey, error: Exception, dropped: int) -> None:
        """The load path met a chunk that does not decode: say so, once per calibration
        (a missing one fails every chunk it encoded) or once per chunk otherwise."""
        from lmc_connector.ops.codecs import MissingCalibrationError

        if isinstance(error, MissingCalibrationError):
            what = ("calibration", str(error.calibration_id))
        else:
            what = ("chunk", f"{key:016x}")
        if what in self._warned or len(self._warned) >= MAX_WARNED:
            return
        self._warned.add(what)
        logger.warning(
            "a cached chunk (%016x) does not decode, treated as a miss and recomputed "
            "(%d copies dropped): %s",
            key,
            dropped,
            error,
        )

    def _code(self, job: TransformJob, chunks: list[Chunk]) -> list[Chunk]:
        if not chunks:
            return []
        if job.kind == "compress":
            return self.encode(job.method, chunks)
        plain = to_tensors(chunks, self.device, self.calibrations.store)
        return [Chunk(c.num_tokens, kv=kv.cpu()) for c, kv in zip(chunks, plain, strict=True)]


def codec_device(config: CacheConfig, serving: torch.device | None) -> torch.device:
    """Where codecs run: `codec_device` of the config, "auto" meaning the serving device."""
    if config.codec_device == "cpu":
        return torch.device("cpu")
    if config.codec_device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("codec_device: cuda was asked for but no CUDA device is visible")
        return serving if serving is not None and serving.type == "cuda" else torch.device("cuda")
    return serving if serving is not None else torch.device("cpu")


def _note(outcome: JobOutcome, error: str) -> None:
    """Add `error` to what the job reports, once each and at most MAX_ERRORS in all (a
    message per chunk would grow with the job)."""
    if error not in outcome.errors and len(outcome.errors) < MAX_ERRORS:
        outcome.errors.append(error)
