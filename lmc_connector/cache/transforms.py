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

import torch

from lmc_connector.cache.chunk import Chunk
from lmc_connector.cache.decode import to_tensors
from lmc_connector.cache.errors import StoredMethodError
from lmc_connector.cache.tiers import Tier, TierContext
from lmc_connector.operations import JobOutcome, TransformKind
from lmc_connector.tokens import ChunkKey

logger = logging.getLogger(__name__)

#: Chunks coded per codec call: enough to keep a GPU busy, bounded so memory stays flat.
BATCH_CHUNKS = 8


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
    """Schedules and runs transform jobs over the tiers of one engine.

    Stateless beyond its codec device: any thread may schedule, and the
    control agent's jobs thread runs them one at a time.
    """

    def __init__(self, ctx: TierContext, device: torch.device) -> None:
        self._ctx = ctx
        self.device = device

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
        `StoredMethodError` naming what is stored. Without `prefix`, the job's
        `num_tokens` is the tokens of the chunks it covers.
        """
        from lmc_connector.ops.codecs import get_codec

        get_codec(method)
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

    def release(self, job: TransformJob) -> None:
        """Drop the pins of a job that will not run."""
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
            outcome.errors.append(f"{job.kind} failed: {e}")
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
                outcome.errors.append(f"no room in {tier.name} for a {job.kind}ed chunk")

    def encode(self, method: str, chunks: list[Chunk]) -> list[Chunk]:
        """Plain chunks encoded with `method` on the codec device (any thread)."""
        from lmc_connector.ops.codecs import get_codec

        codec = get_codec(method)
        kvs = [c.kv.to(self.device) for c in chunks if c.kv is not None]
        blobs = codec.encode_batch(kvs)
        return [
            Chunk(c.num_tokens, blob=b, method=method) for c, b in zip(chunks, blobs, strict=True)
        ]

    def _code(self, job: TransformJob, chunks: list[Chunk]) -> list[Chunk]:
        if not chunks:
            return []
        if job.kind == "compress":
            return self.encode(job.method, chunks)
        plain = to_tensors(chunks, self.device)
        return [Chunk(c.num_tokens, kv=kv.cpu()) for c, kv in zip(chunks, plain, strict=True)]
