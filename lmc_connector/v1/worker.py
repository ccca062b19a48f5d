"""The worker half: owns this rank's chunk cache, loads before the forward, saves after it.

Runs in each vLLM worker process, on vLLM's model-runner thread; the lookup
server thread (`lookup.py`) and the control agent share the cache engine,
which is thread-safe. Local loads and saves are synchronous: `start_load` returns
once the chunks are in the paged cache, `save` once they are in the cache. Loads from a
peer instance are asynchronous (`peers.PeerLoads`): fetched on a background thread and
scattered into the paged cache on the model-runner thread in `finished_loads`. Once per
step vLLM collects this worker's statistics (`take_stats`) and, with KV events on, its
chunk events (`take_events`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lmc_connector.cache import CacheEngine, ChunkLayout
from lmc_connector.cache.layout import dtype_name
from lmc_connector.config import CacheConfig
from lmc_connector.ops import paged
from lmc_connector.ops.paged import KVFormat
from lmc_connector.v1.events import ChunkEventBuffer, LMCKVEvents
from lmc_connector.v1.lookup import LookupServer, PinRegistry
from lmc_connector.v1.metadata import LMCConnectorMetadata, LoadSpec, SaveSpec
from lmc_connector.v1.peers import PeerLoads
from lmc_connector.v1.stats import LMCConnectorStats

if TYPE_CHECKING:
    from lmc_connector.control.agent.agent import ControlAgent

logger = logging.getLogger(__name__)

#: Seconds between two reports of the tiers' usage in the statistics.
USAGE_EVERY_S = 1.0


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """What the worker half needs from vLLM, extracted once by the connector."""

    #: Model name or path: part of the key namespace.
    model: str
    #: This worker's rank among `world_size` (tensor x pipeline parallel).
    rank: int
    world_size: int
    #: Tokens per scheduler block (block ids in the metadata count these).
    block_size: int
    #: IPC address the lookup server binds.
    lookup_address: str
    #: vLLM publishes KV events (`--kv-events-config`): rank 0 reports its chunk events.
    kv_events: bool = False


class LMCWorker:
    """Owns this rank's cache engine, its lookup server and control agent, and the views of
    vLLM's paged KV caches. Loads and saves run on vLLM's model-runner thread; the lookup
    server and the agent run on their own threads over the (thread-safe) engine.

    Construct, `register_kv_caches` (starts serving), `close`.
    """

    def __init__(self, config: CacheConfig, settings: WorkerSettings) -> None:
        self.config = config
        self.settings = settings
        self.engine: CacheEngine | None = None
        self.pins: PinRegistry | None = None
        self.layer_names: list[str] = []
        self._layers: list[list[torch.Tensor]] = []
        #: vLLM's per-layer views as registered (whole-block copies use them directly).
        self._raw: list[torch.Tensor] = []
        self._kernel_block_size = settings.block_size
        #: Copies are rounded up to multiples of this many tokens (a kernel block for formats
        #: whose pages are not token rows; 1 otherwise).
        self._align = 1
        self._server: LookupServer | None = None
        self._agent: ControlAgent | None = None
        self._peer_loads: PeerLoads | None = None
        self._load_errors: set[int] = set()
        self._stats = LMCConnectorStats()
        self._usage_due = 0.0
        self._events: ChunkEventBuffer | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def register_kv_caches(
        self, kv_caches: Mapping[str, torch.Tensor], formats: Mapping[str, KVFormat]
    ) -> None:
        """Work out the chunk layout from vLLM's per-layer views, open the cache, start serving."""
        if not kv_caches:
            raise ValueError("vLLM registered no KV cache layers")
        kinds = {formats[name] for name in kv_caches}
        if len(kinds) != 1:
            raise ValueError(f"layers mix KV formats {sorted(k.value for k in kinds)}")
        fmt = kinds.pop()
        self.layer_names = list(kv_caches)
        self._layers = [paged.plane_views(kv_caches[n], fmt) for n in self.layer_names]
        self._raw = [kv_caches[n] for n in self.layer_names]
        first = self._layers[0][0]
        shapes = {tuple(p.shape[1:]) for planes in self._layers for p in planes}
        if len(shapes) != 1:
            raise ValueError(f"layers have different per-block shapes {sorted(shapes)}")
        _, heads, self._kernel_block_size, head_size = first.shape
        if fmt.whole_blocks:
            self._align = self._kernel_block_size
            if self.config.chunk_size % self._align:
                raise ValueError(
                    f"chunk_size={self.config.chunk_size} must be a multiple of the KV block size "
                    f"{self._align} for the {fmt.value} layout: set chunk_size accordingly"
                )
        layout = ChunkLayout(
            model=self.settings.model,
            world_size=self.settings.world_size,
            rank=self.settings.rank,
            dtype=dtype_name(first.dtype),
            planes=fmt.planes,
            layers=len(self._layers),
            channels=heads * head_size,
            chunk_size=self.config.chunk_size,
        )
        self.engine = CacheEngine(self.config, layout, device=first.device)
        self.engine.open()
        tiers = ", ".join(
            f"{name} {u.used_bytes / 1e9:.2f}/{u.capacity_bytes / 1e9:.2f} GB ({u.chunks} chunks)"
            for name, u in self.engine.usage().items()
        )
        logger.info(
            "lmc_connector worker %d/%d: %d layers, %s, %d kv heads x %d, block %d; tiers: %s",
            self.settings.rank,
            self.settings.world_size,
            layout.layers,
            fmt.value,
            heads,
            head_size,
            self._kernel_block_size,
            tiers,
        )
        if self.settings.kv_events and self.settings.rank == 0:
            self._events = ChunkEventBuffer({t.name: t.event_medium for t in self.engine.tiers})
            self.engine.subscribe(self._events)
        self.pins = PinRegistry(self.engine)
        self._server = LookupServer(self.settings.lookup_address, self.pins, self.reset)
        self._server.start()
        if self.config.enable_controller:
            self._start_agent(self.engine)

    def _start_agent(self, engine: CacheEngine) -> None:
        from lmc_connector.control.agent.agent import ControlAgent
        from lmc_connector.control.wire.security import worker_security

        # One security for every channel of this worker that can leave the host.
        security = worker_security(self.config)
        self._agent = ControlAgent(
            self.config,
            engine,
            self.settings.rank,
            self.settings.world_size,
            self.settings.model,
            security,
        )
        self._agent.start()
        if self._agent.peers is not None:
            self._peer_loads = PeerLoads(engine, self._agent.peers, self.settings.rank)

    def close(self) -> None:
        if self._peer_loads is not None:
            self._peer_loads.close()
            self._peer_loads = None
        if self._agent is not None:
            self._agent.close()
            self._agent = None
        if self._server is not None:
            self._server.close()
            self._server = None
        if self.engine is not None:
            self.engine.close()  # a shared store's writer finishes its queued uploads

    # -- per step --------------------------------------------------------------------------

    def start_load(self, meta: LMCConnectorMetadata) -> None:
        """Scatter every local load of this step into the paged cache before the forward;
        start the fetches of loads from a peer instance."""
        for spec in meta.loads:
            if spec.peers and self._peer_loads is not None:
                self._peer_loads.submit(spec)
                continue
            started = time.perf_counter()
            try:
                self._load(spec)
            finally:
                if self.pins is not None:
                    self.pins.release(spec.req_id)
                self._stats.observe("load_seconds", time.perf_counter() - started)

    def finished_loads(self, finished_req_ids: set[str]) -> set[str]:
        """Requests whose peer load ended since the last call, their chunks now scattered
        into the paged cache (what did not arrive is reported as load errors). Requests
        vLLM finished meanwhile are reported without touching their blocks."""
        if self._peer_loads is None:
            return set()
        done: set[str] = set()
        for spec in self._peer_loads.take_finished():
            try:
                if spec.req_id not in finished_req_ids:
                    self._load(spec)
            except Exception:
                # Boundary of vLLM's load path: chunks from another instance that do not fit
                # this worker's blocks are recomputed, never served.
                logger.exception("%s: chunks from a peer could not be loaded", spec.req_id)
                self._fail_blocks(spec, spec.start)
            finally:
                self._peer_loads.release(spec.req_id)
                if self.pins is not None:
                    self.pins.release(spec.req_id)
            done.add(spec.req_id)
        return done

    def _load(self, spec: LoadSpec) -> None:
        engine = self.engine
        assert engine is not None, "load before register_kv_caches"
        chunk = self.config.chunk_size
        base = spec.first_chunk * chunk
        device = self._layers[0][0].device
        try:
            chunks = engine.get(spec.keys, device=device)
        except Exception:
            # Boundary of vLLM's load path: the tokens are recomputed, never served wrong.
            logger.exception("load of %s failed; its tokens will be recomputed", spec.req_id)
            chunks = []
        available = base + sum(c.shape[2] for c in chunks)
        end = min(spec.end, available)
        if end > spec.start:
            # Whole-block formats write the rest of the last block too: those slots hold
            # tokens this step's forward (re)writes, or none yet.
            stop = min(self._round_up(end), available)
            chunk_start = base
            for kv in chunks:  # chunk by chunk: no concatenated copy of the whole prefix
                lo, hi = max(chunk_start, spec.start), min(chunk_start + kv.shape[2], stop)
                if hi > lo:
                    piece = kv[:, :, lo - chunk_start : hi - chunk_start]
                    self._scatter(spec.block_ids, lo, hi, piece)
                chunk_start += kv.shape[2]
        if end < spec.end:
            self._fail_blocks(spec, end)

    def _fail_blocks(self, spec: LoadSpec, end: int) -> None:
        """Report the blocks of `spec` from token `end` on as not loaded (vLLM recomputes)."""
        bs = self.settings.block_size
        first_bad = max(end, spec.start) // bs
        last = (spec.end + bs - 1) // bs
        self._load_errors.update(spec.block_ids[first_bad:last])
        self._stats.count("load_errors")
        logger.warning(
            "%s: only tokens up to %d of [%d, %d) were loaded; blocks reported for recompute",
            spec.req_id,
            end,
            spec.start,
            spec.end,
        )

    def save(self, meta: LMCConnectorMetadata) -> None:
        """Gather the chunks this step completed and put them into the cache."""
        engine = self.engine
        if engine is None or not meta.saves:
            return
        started = time.perf_counter()
        for spec in meta.saves:
            self._save(engine, spec)
        self._stats.observe("save_seconds", time.perf_counter() - started)

    def _save(self, engine: CacheEngine, spec: SaveSpec) -> None:
        for key, (start, end) in zip(spec.keys, spec.bounds, strict=True):
            if engine.contains(key):
                continue  # e.g. a rank that held more than the minimum over ranks
            try:
                kv = self._gather(spec.block_ids, start, self._round_up(end))
                # A CPU gather is already a private tensor; a GPU one is copied off the device.
                stored = engine.put(key, kv, copy=kv.device.type != "cpu")
            except Exception:
                # Boundary of vLLM's save path: a chunk that could not be saved is a future miss.
                logger.exception("%s: saving chunk [%d, %d) failed", spec.req_id, start, end)
                continue
            if not stored:
                logger.debug("%s: chunk [%d, %d) was not cached", spec.req_id, start, end)

    def reset(self, shared: bool) -> int:
        """Empty this rank's cache (vLLM's cache reset, relayed by the scheduler); returns
        the chunk entries removed. Runs on the lookup server thread."""
        engine = self.engine
        if engine is None:
            return 0
        removed = engine.reset(shared or self.config.reset_shared_store)
        logger.info("rank %d: cache reset, %d chunk entries removed", self.settings.rank, removed)
        return removed

    def take_stats(self) -> LMCConnectorStats | None:
        """This rank's statistics since the last call (vLLM's worker thread, once per step)."""
        stats, self._stats = self._stats, LMCConnectorStats()
        engine = self.engine
        if engine is not None:
            with_tokens = self.settings.rank == 0
            for tier, counts in engine.ctx.stats.take().items():
                values = counts.as_dict()
                if not with_tokens:
                    values = {k: v for k, v in values.items() if not k.endswith("_tokens")}
                stats.add_tier(tier, values)
            now = time.monotonic()
            if now >= self._usage_due:
                self._usage_due = now + USAGE_EVERY_S
                for tier, usage in engine.usage().items():
                    stats.set_gauges(
                        tier,
                        self.settings.rank,
                        {
                            "used_bytes": usage.used_bytes,
                            "capacity_bytes": usage.capacity_bytes,
                            "chunks": usage.chunks,
                        },
                    )
        return None if stats.is_empty() else stats

    def take_events(self) -> LMCKVEvents | None:
        """Chunk events since the last call, as vLLM's KV events (rank 0 only)."""
        return None if self._events is None else self._events.take()

    def take_load_errors(self) -> set[int]:
        """Block ids whose load failed since the last call (reported to vLLM for recompute)."""
        errors, self._load_errors = self._load_errors, set()
        return errors

    def _gather(self, block_ids: list[int], start: int, end: int) -> torch.Tensor:
        blocks, offsets = self._slots(block_ids, start, end)
        if self._align == 1:
            return paged.gather(self._layers, blocks, offsets)
        assert start % self._align == 0 and end % self._align == 0
        return paged.gather_blocks(self._raw, blocks[:: self._align])

    def _scatter(self, block_ids: list[int], start: int, end: int, kv: torch.Tensor) -> None:
        blocks, offsets = self._slots(block_ids, start, end)
        if self._align == 1:
            paged.scatter(self._layers, blocks, offsets, kv)
        else:
            assert start % self._align == 0 and end % self._align == 0
            paged.scatter_blocks(self._raw, blocks[:: self._align], kv)

    def _round_up(self, tokens: int) -> int:
        return -(-tokens // self._align) * self._align

    def _slots(
        self, block_ids: list[int], start: int, end: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return paged.token_slots(
            block_ids,
            start,
            end,
            self.settings.block_size,
            self._kernel_block_size,
            self._layers[0][0].device,
        )
