"""The chunk cache of one vLLM worker: what each operation does, over a list of tiers.

Keys are chained chunk hashes (`lmc_connector.tokens`); the engine belongs to
one `ChunkLayout`, so model, rank and dtype are implied.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from lmc_connector import tokens as tok
from lmc_connector.cache import calibrate, removal
from lmc_connector.cache.calibrate import CalibrationJob
from lmc_connector.cache.calibrations import CalibrationBook
from lmc_connector.cache.chunk import Chunk
from lmc_connector.cache.decode import decoded_prefix
from lmc_connector.cache.errors import UnknownLocationError
from lmc_connector.cache.layout import ChunkLayout
from lmc_connector.cache.removal import Cleared
from lmc_connector.cache.tiers import (
    CacheEventSink,
    LocalCPUBackend,
    Tier,
    TierContext,
    TierUsage,
    build_tiers,
)
from lmc_connector.cache.tiers.base import leading
from lmc_connector.cache.transforms import TransformJob, TransformRunner, codec_device
from lmc_connector.config import CacheConfig, ConfigError
from lmc_connector.operations import TransformKind
from lmc_connector.ops.allocator import Allocator
from lmc_connector.tokens import ChunkKey

__all__ = ["CacheEngine", "CacheEventSink", "Cleared"]


def _fill(where: list[Tier | None], tier: Tier, held: Sequence[bool]) -> None:
    """Name `tier` for every chunk it holds that no nearer tier holds."""
    for i, here in enumerate(held):
        if here and where[i] is None:
            where[i] = tier


@dataclass(frozen=True, slots=True)
class Located:
    """What a lookup found: cached prefix tokens, the nearest tier holding each of its chunks,
    and the keys it pinned."""

    tokens: int
    tiers: list[Tier]
    pinned: list[ChunkKey]


class CacheEngine:
    """Lookup, put, get, pin, remove, clear, move, compress, decompress and calibrate.

    Owns the tiers (nearest first), the context they share (lock, pins,
    chunk-event sinks) and the calibrations its codecs use (`calibrations`).
    Callers, concurrently: vLLM's worker thread (`contains`, `put`, `get`), the
    scheduler's lookup channel (`lookup_keys`, pins) and the control agent
    (everything else). Tensor copies, codec work and I/O run outside the lock.
    """

    def __init__(
        self, config: CacheConfig, layout: ChunkLayout, device: torch.device | None = None
    ) -> None:
        if layout.chunk_size != config.chunk_size:
            raise ValueError(
                f"layout chunk_size {layout.chunk_size} differs from config {config.chunk_size}"
            )
        self.config = config
        self.layout = layout
        self.ctx = TierContext()
        self.lock = self.ctx.lock
        self.calibrations = CalibrationBook()
        runner = TransformRunner(self.ctx, codec_device(config, device), self.calibrations)
        self._transforms = runner
        if not layout.codable:
            _refuse_codecs(config, layout)
        self.tiers = build_tiers(
            config,
            layout,
            self.ctx,
            partial(runner.encode_to_evict, config.compress_before_evict or ""),
            partial(runner.encode_for_store, config.remote_serde),
        )
        self.calibrations.attach(
            [shelf for t in self.tiers if (shelf := t.calibration_shelf()) is not None]
        )
        self._near = [t for t in self.tiers if t.answers_from_memory]
        self._far = [t for t in self.tiers if not t.answers_from_memory]

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        """Prepare the tiers (the disk tier re-admits chunks an earlier run left), then take
        the calibrations an earlier run (or another instance) kept on them."""
        for tier in self.tiers:
            tier.open()
        self.calibrations.open()

    def close(self) -> None:
        for tier in self.tiers:
            tier.close()

    def subscribe(self, sink: CacheEventSink) -> None:
        self.ctx.subscribe(sink)

    def unsubscribe(self, sink: CacheEventSink) -> None:
        self.ctx.unsubscribe(sink)

    # -- introspection ---------------------------------------------------------------------

    @property
    def codec_device(self) -> torch.device:
        """Where compression runs and where the load path decodes (`codec_device`)."""
        return self._transforms.device

    @property
    def locations(self) -> list[str]:
        return [t.name for t in self.tiers]

    def tier(self, location: str) -> Tier:
        """The tier named `location`; UnknownLocationError lists the valid ones."""
        for tier in self.tiers:
            if tier.name == location:
                return tier
        raise UnknownLocationError(location, self.locations)

    def select(self, locations: Iterable[str] | None) -> list[Tier]:
        return list(self.tiers) if locations is None else [self.tier(n) for n in locations]

    def hashes(self, tokens: Sequence[int]) -> list[ChunkKey]:
        """The chunk keys of a prompt (keyed under its scope when it is a `tokens.Prompt`)."""
        return tok.chunk_hashes(tokens, self.layout.chunk_size, tok.scope_of(tokens))

    def snapshot(self) -> dict[str, list[ChunkKey]]:
        """Every key per location, for a full resync with the controller."""
        with self.lock:
            return {t.name: t.chunk_keys() for t in self.tiers}

    def usage(self) -> dict[str, TierUsage]:
        return {t.name: t.usage() for t in self.tiers}

    def _tokens(self, chunks: int, num_tokens: int) -> int:
        return tok.prefix_tokens(chunks, num_tokens, self.layout.chunk_size)

    # -- lookup and pins -------------------------------------------------------------------

    def lookup_keys(
        self,
        keys: Sequence[ChunkKey],
        num_tokens: int,
        locations: Iterable[str] | None = None,
        pin: bool = False,
    ) -> int:
        """Tokens of the cached prefix of a `num_tokens`-long prompt whose chunk keys are `keys`.

        With `pin`, what the local tiers hold is pinned (see `locate`).
        """
        return self.locate(keys, num_tokens, locations, pin).tokens

    def locate(
        self,
        keys: Sequence[ChunkKey],
        num_tokens: int,
        locations: Iterable[str] | None = None,
        pin: bool = False,
    ) -> Located:
        """`lookup_keys`, with the nearest tier holding each chunk of the cached prefix.

        The local tiers' hits are pinned (with `pin`) in the same critical
        section that found them; farther tiers (a shared store, a peer) then
        extend the prefix outside the lock, unpinned (their chunks may vanish
        before the load: that load fails and vLLM recomputes those tokens).
        """
        tiers = self.select(locations)
        near = [t for t in tiers if t.answers_from_memory]
        far = [t for t in tiers if not t.answers_from_memory]
        where: list[Tier | None] = [None] * len(keys)
        with self.lock:
            for tier in near:
                _fill(where, tier, tier.held(keys))
            hits = leading([t is not None for t in where])
            pinned = list(keys[:hits]) if pin else []
            self.ctx.pin(pinned)
        for tier in far:
            if hits == len(keys):
                break
            _fill(where, tier, [False] * hits + tier.held(keys[hits:]))
            hits = leading([t is not None for t in where])
        found = [t for t in where[:hits] if t is not None]
        return Located(self._tokens(hits, num_tokens), found, pinned)

    def lookup(
        self, tokens: Sequence[int], locations: Iterable[str] | None = None, pin: bool = False
    ) -> int:
        """Number of prefix tokens of `tokens` present (in any of `locations`)."""
        return self.lookup_keys(self.hashes(tokens), len(tokens), locations, pin)

    def contains(self, key: ChunkKey) -> bool:
        """Whether a local tier holds `key`; a hit becomes the most recently used there."""
        return any(t.touch(key) for t in self._near)

    def pin_keys(self, keys: Iterable[ChunkKey]) -> None:
        self.ctx.pin(keys)

    def unpin_keys(self, keys: Iterable[ChunkKey]) -> None:
        self.ctx.unpin(keys)

    def pin(self, tokens: Sequence[int], locations: Iterable[str] | None = None) -> int:
        """Pin the cached prefix of `tokens` so eviction skips it; returns the tokens pinned."""
        return self.lookup(tokens, locations, pin=True)

    def unpin(self, tokens: Sequence[int]) -> int:
        """Drop one pin from each chunk of the pinned prefix; returns the tokens unpinned."""
        keys = self.hashes(tokens)
        with self.lock:
            pinned = leading([self.ctx.is_pinned(k) for k in keys])
            self.ctx.unpin(keys[:pinned])
        return self._tokens(pinned, len(tokens))

    def is_pinned(self, key: ChunkKey) -> bool:
        return self.ctx.is_pinned(key)

    # -- put and get -----------------------------------------------------------------------

    def put(self, key: ChunkKey, kv: torch.Tensor, copy: bool = True) -> bool:
        """Store one chunk under `key`; False (and nothing pinned evicted) when it cannot fit.

        The chunk goes to the nearest tier, and every tier is told it was
        saved (a shared store uploads a copy in the background). With
        copy=False a contiguous CPU tensor is kept as is: the caller must not
        modify it afterwards. Never raises for a full or failing tier: a chunk
        that cannot be stored is a future miss.
        """
        self.layout.check(kv)
        if self.contains(key):
            return True
        home = self.tiers[0]
        if copy or kv.device.type != "cpu" or not kv.is_contiguous():
            kv = self.new_buffer(tuple(kv.shape), kv.dtype).copy_(kv)
        chunk = Chunk(kv.shape[2], kv=kv)
        stored = home.store(key, chunk)
        if stored:
            self.ctx.stats.saved(home.name, chunk.num_tokens, chunk.nbytes)
        for tier in self.tiers:
            tier.saved(key, chunk)
        return stored

    def new_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous CPU tensor to build a chunk in before `put(copy=False)`; reuses the
        memory of a removed chunk where the nearest tier keeps such buffers."""
        home = self.tiers[0]
        if isinstance(home, LocalCPUBackend):
            return home.buffer(shape, dtype)
        return torch.empty(shape, dtype=dtype)

    def prefill_buffers(self) -> int:
        """Touch the memory of the nearest tier's buffer pool now, as full-chunk buffers, so
        that a new serving process's first loads and saves fill warm memory; the bytes
        touched (0 without a CPU tier)."""
        home = self.tiers[0]
        if not isinstance(home, LocalCPUBackend):
            return 0
        shape, dtype = self.layout.shape(self.layout.chunk_size), self.layout.torch_dtype
        return home.prefill_buffers(shape, dtype) * self.layout.nbytes(self.layout.chunk_size)

    def get(
        self, keys: Sequence[ChunkKey], device: torch.device | str | None = None
    ) -> list[torch.Tensor]:
        """The plain chunks of the cached prefix of `keys`, stopping at the first miss,
        encoded ones decoded on `device`; the tensors must not be modified."""
        target = torch.device(device) if device is not None else torch.device("cpu")
        return [t.to(target) for t in self.tensors(keys, self.read(keys), target)]

    def tensors(
        self,
        keys: Sequence[ChunkKey],
        chunks: Sequence[Chunk],
        device: torch.device,
        allocate: Allocator | None = None,
    ) -> list[torch.Tensor]:
        """The tensor form of `chunks` (what `read(keys)` returned): plain ones as stored,
        encoded ones decoded together on `device` (into memory from `allocate`, if given).

        A chunk that does not decode (damaged, or its calibration found nowhere)
        is a miss: the result ends before it and its copies are dropped, the shared
        store's too, so that recomputed KV takes its place everywhere (a value no
        instance decodes would otherwise be fetched, and fail, on every request).
        """
        at = [i for i, c in enumerate(chunks) if c.encoded]
        encoded = [chunks[i] for i in at]
        decoded, error = decoded_prefix(encoded, device, self.calibrations.store, allocate)
        if error is not None:
            end = at[len(decoded)]
            bad = keys[end]
            dropped = sum(tier.remove([bad]) for tier in self.tiers)
            self._transforms.undecodable(bad, error, dropped)
            chunks = chunks[:end]
        plain = iter(decoded)
        return [c.kv if c.kv is not None else next(plain) for c in chunks]

    def read(self, keys: Sequence[ChunkKey]) -> list[Chunk]:
        """The chunks of the cached prefix of `keys` as stored, stopping at the first miss.

        Local tiers are read one chunk at a time; the rest is asked of the farther
        tiers in turn, many chunks per request. A chunk found beyond the nearest
        tier is promoted into it.
        """
        chunks: list[Chunk] = []
        for key in keys:
            chunk = self._read_near(key)
            if chunk is None:
                break
            chunks.append(chunk)
        for tier in self._far:
            rest = keys[len(chunks) :]
            if not rest:
                break
            for key, chunk in zip(rest, tier.load_many(rest), strict=True):
                if chunk is None:
                    break
                self.tiers[0].store(key, chunk)
                chunks.append(chunk)
        return chunks

    def _read_near(self, key: ChunkKey) -> Chunk | None:
        for depth, tier in enumerate(self._near):
            _, chunk = tier.load(key)
            if chunk is not None:
                self.ctx.stats.loaded(tier.name, chunk.num_tokens, chunk.nbytes)
                tier.touch(key)
                if depth > 0:
                    self.tiers[0].store(key, chunk)
                return chunk
        return None

    # -- chunks as stored, for and from other instances ---------------------------------------

    def stored(self, keys: Sequence[ChunkKey], location: str | None = None) -> list[Chunk]:
        """The chunks of the cached prefix of `keys` as stored (encoded ones stay encoded),
        stopping at the first miss; from `location`, or from any local tier when None (a
        shared store is read by whoever wants it, not through this worker). Nothing is
        promoted. The chunks are immutable: callers may send their bytes without a copy."""
        tiers = self._near if location is None else [self.tier(location)]
        chunks: list[Chunk] = []
        for key in keys:
            chunk = next((c for t in tiers if (c := t.load(key)[1]) is not None), None)
            if chunk is None:
                break
            chunks.append(chunk)
        return chunks

    def admit(self, key: ChunkKey, chunk: Chunk, location: str | None = None) -> bool:
        """Store a chunk that came from another instance in `location` (the nearest tier when
        None); False when it cannot be kept. Not written through to a shared store: the
        instance that computed it did that."""
        if chunk.kv is not None:
            self.layout.check(chunk.kv)
        tier = self.tiers[0] if location is None else self.tier(location)
        return tier.store(key, chunk)

    # -- removal and moves -------------------------------------------------------------------

    def remove(self, tokens: Sequence[int], locations: Iterable[str] | None = None) -> int:
        """Remove every chunk of `tokens` (pinned ones too); returns the chunk entries removed."""
        keys = self.hashes(tokens)
        return sum(tier.remove(keys) for tier in self.select(locations))

    def clear(self, location: str | None = None) -> Cleared:
        """Remove every unpinned chunk of one location (all when None); see removal.clear."""
        return removal.clear(self.select(None if location is None else [location]))

    def reset(self, shared: bool = False) -> int:
        """Remove every chunk of the tiers this instance owns (and of shared ones with
        `shared`), pinned ones included: what vLLM's `/reset_prefix_cache?reset_external=true`
        does (see removal.reset). Returns the chunk entries removed."""
        return removal.reset(self.ctx, self.tiers, shared)

    def move(self, tokens: Sequence[int], source: str, destination: str) -> int:
        """Move the cached prefix of `tokens` from `source` to `destination`; returns tokens moved.

        A chunk leaves the source only once the destination holds it.
        """
        src, dst = self.tier(source), self.tier(destination)
        if src is dst:
            raise UnknownLocationError(destination, [n for n in self.locations if n != source])
        moved = 0
        for key in self.hashes(tokens):
            marker, chunk = src.load(key)
            if chunk is None or not dst.store(key, chunk):
                break
            src.remove_seen(key, marker)
            moved += 1
        return self._tokens(moved, len(tokens))

    # -- compress and decompress -----------------------------------------------------------

    def schedule(
        self, kind: TransformKind, tokens: Sequence[int] | None, method: str, location: str
    ) -> TransformJob:
        """Validate and pin the chunks a compress/decompress will touch; run it with `run`.

        The chunks are the cached prefix of `tokens`, or every chunk in `location` when
        `tokens` is None. Raises `StoredMethodError` for a decompress with a method none
        of those chunks was encoded with, ValueError for a compress of quantized bytes.
        """
        if kind == "compress" and not self.layout.codable:
            raise ValueError(
                f"this worker's KV cache is {self.layout.cache_dtype} ({self.layout.dtype}): "
                "its chunks are already quantized bytes and are stored as they are; "
                "compression needs a float16/bfloat16/float32 KV cache"
            )
        tier = self.tier(location)
        if tokens is None:
            return self._transforms.schedule(kind, tier, tier.chunk_keys(), method, prefix=False)
        job = self._transforms.schedule(kind, tier, self.hashes(tokens), method)
        job.outcome.num_tokens = self._tokens(len(job.keys), len(tokens))
        return job

    def release(self, job: TransformJob | CalibrationJob) -> None:
        """Drop the pins of a scheduled job (one that will not run, or a calibration that ran)."""
        self._transforms.release(job)

    def run(self, job: TransformJob) -> TransformJob:
        """Carry out a scheduled job (may take long; never holds the lock while coding)."""
        return self._transforms.run(job)

    def compress(self, tokens: Sequence[int] | None, method: str, location: str) -> int:
        """Encode the cached prefix of `tokens` (None: every chunk) in `location`; returns the
        tokens covered."""
        return self.run(self.schedule("compress", tokens, method, location)).outcome.num_tokens

    def decompress(self, tokens: Sequence[int] | None, method: str, location: str) -> int:
        """Turn encoded chunks of the cached prefix back into plain tensors."""
        return self.run(self.schedule("decompress", tokens, method, location)).outcome.num_tokens

    # -- calibration -------------------------------------------------------------------------

    def schedule_calibration(self, method: str) -> CalibrationJob:
        """Choose and pin the samples of a calibration of `method` (see calibrate.schedule)."""
        return calibrate.schedule(method, self._near, self.ctx, self.layout)

    def calibrate(self, job: CalibrationJob) -> CalibrationJob:
        """Fit and adopt the calibration (see calibrate.run; never holds the lock)."""
        try:
            return calibrate.run(job, self.calibrations, self._transforms.device, self.layout)
        finally:
            self.release(job)


def _refuse_codecs(config: CacheConfig, layout: ChunkLayout) -> None:
    """ConfigError for a setting that codes chunks of a KV cache whose chunks are quantized
    bytes (fp8 / int8 KV cache), which no codec codes."""
    asked = []
    if config.compress_before_evict is not None:
        asked.append(f"compress_before_evict={config.compress_before_evict}")
    if config.remote_url is not None and config.remote_serde != "naive":
        asked.append(f"remote_serde={config.remote_serde}")
    if asked:
        raise ConfigError(
            f"{' and '.join(asked)}: this worker's KV cache is {layout.cache_dtype}, whose "
            "chunks are quantized bytes no codec codes; unset compress_before_evict and use "
            "remote_serde: naive, or serve with a float16/bfloat16 KV cache"
        )
