"""Compress and decompress chunks in place, and decode them for loading.

Codecs are imported on first use, so a cache that never compresses never
loads them. A job pins its chunks when scheduled, codes them in batches outside the
engine lock on the codec device, then swaps each chunk only if nobody
replaced it meanwhile. A load racing a job sees the old or the new chunk,
never a half state; a failed encode leaves the old chunk where it was.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from lmc_connector import tokens as tok
from lmc_connector.cache.chunk import Chunk
from lmc_connector.cache.errors import CacheError

if TYPE_CHECKING:
    from lmc_connector.cache.tiers import Tiers

logger = logging.getLogger(__name__)

Kind = Literal["compress", "decompress"]
KINDS: tuple[Kind, ...] = ("compress", "decompress")
#: Chunks coded per codec call: enough to keep a GPU busy, bounded so memory stays flat.
BATCH_CHUNKS = 8


@dataclass(slots=True)
class TransformJob:
    """One compress or decompress over the chunks of one location.

    `num_tokens` is known when scheduled; the counters fill in as it runs.
    """

    kind: Kind
    method: str
    location: str
    keys: list[int]
    num_tokens: int
    chunks_done: int = 0
    chunks_skipped: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


class TransformRunner:
    def __init__(self, tiers: Tiers, chunk_size: int, device: torch.device) -> None:
        self._tiers = tiers
        self._chunk_size = chunk_size
        self.device = device

    def schedule(
        self, kind: str, keys: list[int], num_tokens: int, method: str, location: str
    ) -> TransformJob:
        if kind not in KINDS:
            raise CacheError(f"unknown operation '{kind}'; valid: {', '.join(KINDS)}")
        from lmc_connector.ops.codecs import get_codec

        get_codec(method)
        tiers = self._tiers
        backend = tiers.backend(location)
        with tiers.lock:
            hits = tiers.prefix_hits(keys, backend.__contains__)
            tiers.pin(keys[:hits])
        covered = tok.prefix_tokens(hits, num_tokens, self._chunk_size)
        job_kind: Kind = "compress" if kind == "compress" else "decompress"
        return TransformJob(job_kind, method, location, keys[:hits], covered)

    def run(self, job: TransformJob) -> TransformJob:
        start = time.perf_counter()
        try:
            for i in range(0, len(job.keys), BATCH_CHUNKS):
                self._run_batch(job, job.keys[i : i + BATCH_CHUNKS])
        finally:
            self._tiers.unpin(job.keys)
            job.seconds = time.perf_counter() - start
        return job

    def _run_batch(self, job: TransformJob, keys: list[int]) -> None:
        tiers = self._tiers
        backend = tiers.backend(job.location)
        loaded = [(key, *tiers.load(backend, key)) for key in keys]
        todo = [
            (key, marker, chunk)
            for key, marker, chunk in loaded
            if chunk is not None and chunk.encoded == (job.kind == "decompress")
        ]
        job.chunks_skipped += len(keys) - len(todo)
        try:
            fresh = self._code(job, [chunk for _, _, chunk in todo])
        except (ValueError, RuntimeError) as e:
            logger.exception("%s with %s failed; chunks left as they were", job.kind, job.method)
            job.errors.append(f"{job.kind} failed: {e}")
            return
        for (key, marker, old), new in zip(todo, fresh, strict=True):
            swapped = tiers.replace(backend, key, marker, new)
            if swapped is None:
                job.chunks_skipped += 1
            elif swapped:
                job.chunks_done += 1
                job.bytes_before += old.nbytes
                job.bytes_after += new.nbytes
            else:
                job.errors.append(f"no room in {job.location} for a {job.kind}ed chunk")

    def _code(self, job: TransformJob, chunks: list[Chunk]) -> list[Chunk]:
        if not chunks:
            return []
        if job.kind == "compress":
            from lmc_connector.ops.codecs import get_codec

            codec = get_codec(job.method)
            kvs = [c.kv.to(self.device) for c in chunks if c.kv is not None]
            blobs = codec.encode_batch(kvs)
            return [
                Chunk(c.num_tokens, blob=b, method=job.method)
                for c, b in zip(chunks, blobs, strict=True)
            ]
        plain = self.plain(chunks, self.device)
        return [Chunk(c.num_tokens, kv=kv.cpu()) for c, kv in zip(chunks, plain, strict=True)]

    def plain(
        self, chunks: list[Chunk], device: torch.device | str | None = None
    ) -> list[torch.Tensor]:
        """The tensor form of each chunk on `device` (default CPU), decoding where needed."""
        target = torch.device(device) if device is not None else torch.device("cpu")
        out: list[torch.Tensor] = []
        for chunk in chunks:
            if chunk.kv is not None:
                out.append(chunk.kv.to(target))
            else:
                from lmc_connector.ops.codecs import decode_blob

                assert chunk.blob is not None
                out.append(decode_blob(chunk.blob, device=target))
        return out
