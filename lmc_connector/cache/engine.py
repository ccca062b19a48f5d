"""The chunk cache of one vLLM worker: what each operation does, over `Tiers`.

Keys are chained chunk hashes (`lmc_connector.tokens`); the engine belongs to
one `ChunkLayout`, so model, rank and dtype are implied. Callers: vLLM's
worker thread (`contains`, `put`, `get`, `lookup_keys`), the scheduler's
lookup channel and the control agent (everything else), concurrently. One
lock guards the metadata; tensor copies, codec work and file I/O run outside it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from lmc_connector import tokens as tok
from lmc_connector.cache.backends import CPU, DISK, LocalCPUBackend
from lmc_connector.cache.backends import LocalDiskBackend as DiskBackend
from lmc_connector.cache.backends.disk import discard
from lmc_connector.cache.chunk import Chunk
from lmc_connector.cache.errors import UnknownLocationError
from lmc_connector.cache.layout import ChunkLayout
from lmc_connector.cache.tiers import Backend, CacheEventSink, Tiers
from lmc_connector.cache.transform import TransformJob, TransformRunner
from lmc_connector.config import CacheConfig

logger = logging.getLogger(__name__)

__all__ = ["CacheEngine", "CacheEventSink"]


class CacheEngine:
    """Lookup, put, get, pin, remove, clear, move, compress and decompress chunks."""

    def __init__(
        self, config: CacheConfig, layout: ChunkLayout, device: torch.device | None = None
    ) -> None:
        if layout.chunk_size != config.chunk_size:
            raise ValueError(
                f"layout chunk_size {layout.chunk_size} differs from config {config.chunk_size}"
            )
        self.config = config
        self.layout = layout
        backends: dict[str, Backend] = {}
        if config.local_cpu:
            backends[CPU] = LocalCPUBackend(config.max_local_cpu_bytes)
        if config.local_disk is not None:
            root = Path(config.local_disk) / layout.fingerprint()
            backends[DISK] = DiskBackend(root, config.max_local_disk_bytes)
        self.tiers = Tiers(backends)
        self.lock = self.tiers.lock
        self._transforms = TransformRunner(
            self.tiers, layout.chunk_size, _codec_device(config, device)
        )

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        """Prepare the tiers; the disk tier re-admits chunks an earlier run left."""
        disk = self.tiers.disk
        if disk is not None:
            with self.lock:
                found = disk.open()
                self.tiers.emit_admit(DISK, found)
            if found:
                logger.info("disk tier %s: re-admitted %d chunks", disk.root, len(found))

    def subscribe(self, sink: CacheEventSink) -> None:
        self.tiers.subscribe(sink)

    def unsubscribe(self, sink: CacheEventSink) -> None:
        self.tiers.unsubscribe(sink)

    # -- introspection ---------------------------------------------------------------------

    @property
    def locations(self) -> list[str]:
        return list(self.tiers.backends)

    def backend(self, location: str) -> Backend:
        """The tier named `location`; UnknownLocationError lists the valid ones."""
        return self.tiers.backend(location)

    def hashes(self, tokens: Sequence[int]) -> list[int]:
        return tok.chunk_hashes(tokens, self.layout.chunk_size)

    def snapshot(self) -> dict[str, list[int]]:
        """Every key per location, for a full resync with the controller."""
        with self.lock:
            return {name: list(b.keys()) for name, b in self.tiers.backends.items()}

    def usage(self) -> dict[str, tuple[int, int, int]]:
        """(chunks, used bytes, capacity bytes) per location."""
        with self.lock:
            return {
                n: (len(b), b.used_bytes, b.capacity_bytes) for n, b in self.tiers.backends.items()
            }

    def _tokens(self, chunks: int, num_tokens: int) -> int:
        return tok.prefix_tokens(chunks, num_tokens, self.layout.chunk_size)

    # -- lookup and pins -------------------------------------------------------------------

    def lookup_keys(
        self,
        keys: Sequence[int],
        num_tokens: int,
        locations: Iterable[str] | None = None,
        pin: bool = False,
    ) -> int:
        """Tokens of the cached prefix of a `num_tokens`-long prompt whose chunk keys are `keys`."""
        backends = self.tiers.select(locations)
        with self.lock:
            hits = self.tiers.prefix_hits(keys, lambda k: any(k in b for b in backends))
            if pin:
                self.tiers.pin(keys[:hits])
        return self._tokens(hits, num_tokens)

    def lookup(
        self, tokens: Sequence[int], locations: Iterable[str] | None = None, pin: bool = False
    ) -> int:
        """Number of prefix tokens of `tokens` present (in any of `locations`)."""
        return self.lookup_keys(self.hashes(tokens), len(tokens), locations, pin)

    def contains(self, key: int) -> bool:
        """Whether any tier holds `key`; a hit becomes the most recently used there."""
        with self.lock:
            return any(b.touch(key) is not None for b in self.tiers.backends.values())

    def pin_keys(self, keys: Iterable[int]) -> None:
        self.tiers.pin(keys)

    def unpin_keys(self, keys: Iterable[int]) -> None:
        self.tiers.unpin(keys)

    def pin(self, tokens: Sequence[int], locations: Iterable[str] | None = None) -> int:
        """Pin the cached prefix of `tokens` so eviction skips it; returns the tokens pinned."""
        return self.lookup(tokens, locations, pin=True)

    def unpin(self, tokens: Sequence[int]) -> int:
        """Drop one pin from each chunk of the pinned prefix; returns the tokens unpinned."""
        keys = self.hashes(tokens)
        with self.lock:
            pinned = self.tiers.prefix_hits(keys, self.tiers.pins.__contains__)
            self.unpin_keys(keys[:pinned])
        return self._tokens(pinned, len(tokens))

    def is_pinned(self, key: int) -> bool:
        return key in self.tiers.pins

    # -- put and get -----------------------------------------------------------------------

    def put(self, key: int, kv: torch.Tensor, copy: bool = True) -> bool:
        """Store one chunk under `key`; False (and nothing pinned evicted) when it cannot fit.

        The chunk goes to the first tier (CPU, or disk when there is no CPU
        tier). With copy=False a contiguous CPU tensor is kept as is: the
        caller must not modify it afterwards. Never raises for a full or
        failing tier: a chunk that cannot be stored is a future miss.
        """
        self.layout.check(kv)
        if self.contains(key):
            return True
        cpu = self.tiers.cpu
        if copy or kv.device.type != "cpu" or not kv.is_contiguous():
            if cpu is not None:
                kv = cpu.buffer(tuple(kv.shape), kv.dtype).copy_(kv)
            else:
                kv = kv.detach().to("cpu", copy=True).contiguous()
        chunk = Chunk(kv.shape[2], kv=kv)
        home = cpu if cpu is not None else self.tiers.disk
        assert home is not None
        return self.tiers.store(home, key, chunk)

    def get(
        self, keys: Sequence[int], device: torch.device | str | None = None
    ) -> list[torch.Tensor]:
        """The plain chunks of the cached prefix of `keys`, stopping at the first miss.

        Encoded chunks are decoded on the way; the tensors must not be modified.
        A chunk found only on disk is promoted to the CPU tier.
        """
        chunks: list[Chunk] = []
        for key in keys:
            chunk = self._read(key)
            if chunk is None:
                break
            chunks.append(chunk)
        self.tiers.flush_spills()
        return self._transforms.plain(chunks, device)

    def _read(self, key: int) -> Chunk | None:
        tiers, cpu, disk = self.tiers, self.tiers.cpu, self.tiers.disk
        if cpu is not None:
            with self.lock:
                chunk = cpu.touch(key)
            if chunk is not None:
                return chunk
        if disk is None:
            return None
        _, chunk = tiers.disk_read(disk, key)
        if chunk is not None and cpu is not None:
            with self.lock:
                if key not in cpu:
                    tiers.insert(cpu, key, chunk)
        return chunk

    # -- removal and moves -------------------------------------------------------------------

    def remove(self, tokens: Sequence[int], locations: Iterable[str] | None = None) -> int:
        """Remove every chunk of `tokens` (pinned ones too); returns the chunks removed."""
        backends = self.tiers.select(locations)
        keys = self.hashes(tokens)
        if any(b is self.tiers.disk for b in backends):
            self.tiers.cancel_spills(keys)
        removed = 0
        with self.lock:
            for key in keys:
                for b in backends:
                    if b.remove(key):
                        self.tiers.emit_evict(b.name, [key])
                        removed += 1
        return removed

    def clear(self, location: str | None = None) -> tuple[int, int]:
        """Remove every unpinned chunk of one location (all when None).

        Returns (removed, kept because pinned). Disk files are deleted after
        the lock is released.
        """
        tiers = self.tiers
        backends = tiers.select(None if location is None else [location])
        disk = tiers.disk
        if disk is not None and disk in backends:
            tiers.cancel_spills()
        removed = kept = 0
        doomed: list[Path] = []
        with self.lock:
            for b in backends:
                gone = []
                for key in list(b.keys()):
                    if key in tiers.pins:
                        kept += 1
                    elif b is disk and disk.forget(key):
                        gone.append(key)
                        doomed.append(disk.path(key))
                    elif b is not disk and b.remove(key):
                        gone.append(key)
                tiers.emit_evict(b.name, gone)
                removed += len(gone)
        for path in doomed:
            discard(path)
        return removed, kept

    def move(self, tokens: Sequence[int], source: str, destination: str) -> int:
        """Move the cached prefix of `tokens` from `source` to `destination`; returns tokens moved.

        A chunk leaves the source only once the destination holds it.
        """
        tiers = self.tiers
        src, dst = tiers.backend(source), tiers.backend(destination)
        if src is dst:
            raise UnknownLocationError(destination, [n for n in tiers.backends if n != source])
        moved = 0
        for key in self.hashes(tokens):
            marker, chunk = tiers.load(src, key)
            if chunk is None or not tiers.store(dst, key, chunk):
                break
            with self.lock:
                if src.peek(key) is marker and src.remove(key):
                    tiers.emit_evict(src.name, [key])
            moved += 1
        return self._tokens(moved, len(tokens))

    # -- compress and decompress -----------------------------------------------------------

    def schedule(
        self, kind: str, tokens: Sequence[int], method: str, location: str
    ) -> TransformJob:
        """Validate and pin the chunks a compress/decompress will touch; run it with `run`."""
        return self._transforms.schedule(kind, self.hashes(tokens), len(tokens), method, location)

    def run(self, job: TransformJob) -> TransformJob:
        """Carry out a scheduled job (may take long; never holds the lock while coding)."""
        return self._transforms.run(job)

    def compress(self, tokens: Sequence[int], method: str, location: str) -> int:
        """Encode the cached prefix of `tokens` in `location`; returns the tokens covered."""
        return self.run(self.schedule("compress", tokens, method, location)).num_tokens

    def decompress(self, tokens: Sequence[int], method: str, location: str) -> int:
        """Turn encoded chunks of the cached prefix back into plain tensors."""
        return self.run(self.schedule("decompress", tokens, method, location)).num_tokens


def _codec_device(config: CacheConfig, serving: torch.device | None) -> torch.device:
    if config.codec_device == "cpu":
        return torch.device("cpu")
    if config.codec_device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("codec_device: cuda was asked for but no CUDA device is visible")
        return serving if serving is not None and serving.type == "cuda" else torch.device("cuda")
    return serving if serving is not None else torch.device("cpu")
