"""The chunk cache of one vLLM worker: tiers, pins, eviction, events.

Keys are chained chunk hashes (`lmc_connector.tokens`); the engine belongs to
one `ChunkLayout`, so model, rank and dtype are implied. Callers: vLLM's
worker thread (`put`, `get`, `lookup_keys`), the scheduler's lookup channel
and the control agent (everything else), concurrently. One lock guards the
metadata; codec work and tensor copies run outside it.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import torch

from lmc_connector import tokens as tok
from lmc_connector.cache.backends import CPU, DISK, CorruptChunkError, LocalCPUBackend
from lmc_connector.cache.backends import LocalDiskBackend as DiskBackend
from lmc_connector.cache.chunk import Chunk
from lmc_connector.cache.errors import UnknownLocationError
from lmc_connector.cache.layout import ChunkLayout
from lmc_connector.cache.transform import TransformJob, TransformRunner
from lmc_connector.config import CacheConfig

logger = logging.getLogger(__name__)

Backend = LocalCPUBackend | DiskBackend


class CacheEventSink(Protocol):
    """Told of every chunk entering or leaving a location, under the engine lock.

    Implementations must be quick and must not call back into the engine
    (the control agent appends to a queue).
    """

    def chunks_admitted(self, location: str, keys: Sequence[int]) -> None: ...

    def chunks_evicted(self, location: str, keys: Sequence[int]) -> None: ...


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
        self.lock = threading.RLock()
        self._backends: dict[str, Backend] = {}
        if config.local_cpu:
            self._backends[CPU] = LocalCPUBackend(config.max_local_cpu_bytes)
        if config.local_disk is not None:
            root = Path(config.local_disk) / layout.fingerprint()
            self._backends[DISK] = DiskBackend(root, config.max_local_disk_bytes)
        self._pins: Counter[int] = Counter()
        self._sinks: list[CacheEventSink] = []
        self._transforms = TransformRunner(self, _codec_device(config, device))

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        """Prepare the tiers; the disk tier re-admits chunks an earlier run left."""
        disk = self._backends.get(DISK)
        if isinstance(disk, DiskBackend):
            with self.lock:
                found = disk.open()
                self._emit_admit(DISK, found)
            if found:
                logger.info("disk tier %s: re-admitted %d chunks", disk.root, len(found))

    def subscribe(self, sink: CacheEventSink) -> None:
        with self.lock:
            self._sinks.append(sink)

    def unsubscribe(self, sink: CacheEventSink) -> None:
        with self.lock:
            if sink in self._sinks:
                self._sinks.remove(sink)

    # -- introspection ---------------------------------------------------------------------

    @property
    def locations(self) -> list[str]:
        return list(self._backends)

    def backend(self, location: str) -> Backend:
        try:
            return self._backends[location]
        except KeyError:
            raise UnknownLocationError(location, self._backends) from None

    def hashes(self, tokens: Sequence[int]) -> list[int]:
        return tok.chunk_hashes(tokens, self.layout.chunk_size)

    def snapshot(self) -> dict[str, list[int]]:
        """Every key per location, for a full resync with the controller."""
        with self.lock:
            return {name: list(b.keys()) for name, b in self._backends.items()}

    def usage(self) -> dict[str, tuple[int, int, int]]:
        """(chunks, used bytes, capacity bytes) per location."""
        with self.lock:
            return {n: (len(b), b.used_bytes, b.capacity_bytes) for n, b in self._backends.items()}

    # -- lookup and pins -------------------------------------------------------------------

    def _backends_for(self, locations: Iterable[str] | None) -> list[Backend]:
        if locations is None:
            return list(self._backends.values())
        return [self.backend(name) for name in locations]

    def lookup_keys(
        self,
        keys: Sequence[int],
        num_tokens: int,
        locations: Iterable[str] | None = None,
        pin: bool = False,
    ) -> int:
        """Tokens of the cached prefix of a `num_tokens`-long prompt whose chunk keys are `keys`."""
        backends = self._backends_for(locations)
        with self.lock:
            hits = 0
            for key in keys:
                if not any(key in b for b in backends):
                    break
                hits += 1
            if pin:
                self._pins.update(keys[:hits])
        return tok.prefix_tokens(hits, num_tokens, self.layout.chunk_size)

    def lookup(
        self, tokens: Sequence[int], locations: Iterable[str] | None = None, pin: bool = False
    ) -> int:
        """Number of prefix tokens of `tokens` present (in any of `locations`)."""
        return self.lookup_keys(self.hashes(tokens), len(tokens), locations, pin)

    def pin_keys(self, keys: Iterable[int]) -> None:
        with self.lock:
            self._pins.update(keys)

    def unpin_keys(self, keys: Iterable[int]) -> None:
        with self.lock:
            for key in keys:
                if self._pins[key] <= 1:
                    self._pins.pop(key, None)
                else:
                    self._pins[key] -= 1

    def pin(self, tokens: Sequence[int], locations: Iterable[str] | None = None) -> int:
        """Pin the cached prefix of `tokens` so eviction skips it; returns the tokens pinned."""
        return self.lookup(tokens, locations, pin=True)

    def unpin(self, tokens: Sequence[int]) -> int:
        """Drop one pin from each chunk of the cached prefix; returns the tokens unpinned."""
        keys = self.hashes(tokens)
        with self.lock:
            pinned = 0
            for key in keys:
                if key not in self._pins:
                    break
                pinned += 1
            self.unpin_keys(keys[:pinned])
        return tok.prefix_tokens(pinned, len(tokens), self.layout.chunk_size)

    def is_pinned(self, key: int) -> bool:
        return key in self._pins

    # -- put and get -----------------------------------------------------------------------

    def put(self, key: int, kv: torch.Tensor, copy: bool = True) -> bool:
        """Store one chunk under `key`; False (and nothing evicted) when it cannot fit.

        With copy=False a contiguous CPU tensor is kept as is: the caller must
        not modify it afterwards.
        """
        self.layout.check(kv)
        home = next(iter(self._backends.values()))
        with self.lock:
            if any(key in b for b in self._backends.values()):
                home.read(key)
                return True
        if copy or kv.device.type != "cpu" or not kv.is_contiguous():
            if isinstance(home, LocalCPUBackend):
                kv = home.buffer(tuple(kv.shape), kv.dtype).copy_(kv)
            else:
                kv = kv.detach().to("cpu", copy=True).contiguous()
        chunk = Chunk(kv.shape[2], kv=kv)
        with self.lock:
            return self._insert(home, key, chunk)

    def get(
        self, keys: Sequence[int], device: torch.device | str | None = None
    ) -> list[torch.Tensor]:
        """The plain chunks of the cached prefix of `keys`, stopping at the first miss.

        Encoded chunks are decoded on the way; the tensors must not be modified.
        """
        chunks: list[Chunk] = []
        for key in keys:
            chunk = self._read(key)
            if chunk is None:
                break
            chunks.append(chunk)
        return self._transforms.plain(chunks, device)

    def _read(self, key: int) -> Chunk | None:
        with self.lock:
            cpu = self._backends.get(CPU)
            if isinstance(cpu, LocalCPUBackend):
                chunk = cpu.read(key)
                if chunk is not None:
                    return chunk
            disk = self._backends.get(DISK)
            if not isinstance(disk, DiskBackend) or key not in disk:
                return None
            try:
                chunk = disk.read(key)
            except CorruptChunkError as e:
                logger.error("%s", e)
                self._emit_evict(DISK, [key])
                return None
            if chunk is not None and isinstance(cpu, LocalCPUBackend):
                self._insert(cpu, key, chunk)
            return chunk

    # -- removal ---------------------------------------------------------------------------

    def remove(self, tokens: Sequence[int], locations: Iterable[str] | None = None) -> int:
        """Remove every chunk of `tokens` (pinned ones too); returns the chunks removed."""
        backends = self._backends_for(locations)
        removed = 0
        with self.lock:
            for key in self.hashes(tokens):
                for b in backends:
                    if b.remove(key):
                        self._emit_evict(b.name, [key])
                        removed += 1
        return removed

    def clear(self, location: str | None = None) -> tuple[int, int]:
        """Remove every unpinned chunk of one location (all when None).

        Returns (removed, kept because pinned).
        """
        backends = self._backends_for(None if location is None else [location])
        removed = kept = 0
        with self.lock:
            for b in backends:
                gone = []
                for key in list(b.keys()):
                    if key in self._pins:
                        kept += 1
                    elif b.remove(key):
                        gone.append(key)
                self._emit_evict(b.name, gone)
                removed += len(gone)
        return removed, kept

    def move(self, tokens: Sequence[int], source: str, destination: str) -> int:
        """Move the cached prefix of `tokens` from `source` to `destination`; returns tokens moved.

        A chunk is removed from the source only once the destination holds it.
        """
        src, dst = self.backend(source), self.backend(destination)
        if src is dst:
            raise UnknownLocationError(destination, [n for n in self._backends if n != source])
        keys = self.hashes(tokens)
        moved = 0
        with self.lock:
            for key in keys:
                if key not in src:
                    break
                chunk = self._load(src, key)
                if chunk is None or not (key in dst or self._insert(dst, key, chunk)):
                    break
                src.remove(key)
                self._emit_evict(src.name, [key])
                moved += 1
        return tok.prefix_tokens(moved, len(tokens), self.layout.chunk_size)

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

    # -- internals (call with the lock held) -----------------------------------------------

    def _load(self, backend: Backend, key: int) -> Chunk | None:
        if isinstance(backend, LocalCPUBackend):
            return backend.peek(key)
        try:
            return backend.read(key)
        except CorruptChunkError as e:
            logger.error("%s", e)
            self._emit_evict(backend.name, [key])
            return None

    def replace(self, backend: Backend, key: int, chunk: Chunk) -> bool:
        """Swap the chunk stored under `key` for an equivalent one of another form."""
        need = _stored_size(backend, chunk) - _stored_size_of_key(backend, key)
        if need > 0 and not self._make_room(backend, need, exclude=key):
            return False
        backend.write(key, chunk)
        return True

    def _insert(self, backend: Backend, key: int, chunk: Chunk) -> bool:
        if not self._make_room(backend, _stored_size(backend, chunk), exclude=key):
            logger.warning(
                "%s full: a %d-byte chunk does not fit beside pinned chunks",
                backend.name,
                chunk.nbytes,
            )
            return False
        backend.write(key, chunk)
        self._emit_admit(backend.name, [key])
        return True

    def _make_room(self, backend: Backend, need: int, exclude: int) -> bool:
        victims = backend.victims(need, lambda k: k == exclude or k in self._pins)
        if victims is None:
            return False
        for key in victims:
            if isinstance(backend, LocalCPUBackend):
                self._spill(backend, key)
            backend.remove(key)
            self._emit_evict(backend.name, [key])
        return True

    def _spill(self, cpu: LocalCPUBackend, key: int) -> None:
        """Copy a chunk leaving the CPU tier to the disk tier, if there is one."""
        disk = self._backends.get(DISK)
        chunk = cpu.peek(key)
        if isinstance(disk, DiskBackend) and chunk is not None and key not in disk:
            self._insert(disk, key, chunk)

    def _emit_admit(self, location: str, keys: Sequence[int]) -> None:
        if keys:
            for sink in self._sinks:
                sink.chunks_admitted(location, keys)

    def _emit_evict(self, location: str, keys: Sequence[int]) -> None:
        if keys:
            for sink in self._sinks:
                sink.chunks_evicted(location, keys)


def _stored_size(backend: Backend, chunk: Chunk) -> int:
    return backend.size_of(chunk)


def _stored_size_of_key(backend: Backend, key: int) -> int:
    entry = backend.peek(key)
    return 0 if entry is None else entry.nbytes


def _codec_device(config: CacheConfig, serving: torch.device | None) -> torch.device:
    if config.codec_device == "cpu":
        return torch.device("cpu")
    if config.codec_device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("codec_device: cuda was asked for but no CUDA device is visible")
        return serving if serving is not None and serving.type == "cuda" else torch.device("cuda")
    return serving if serving is not None else torch.device("cpu")
