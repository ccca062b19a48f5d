"""The worker half: owns this rank's chunk cache, loads before the forward, saves after it.

Runs in each vLLM worker process, on vLLM's model-runner thread; the lookup
server thread (`lookup.py`), the save thread (`saver.py`) and the control
agent share the cache engine, which is thread-safe. Local loads are
synchronous: `start_load` returns once the chunks are in the paged cache, one
chunk at a time through staging (`loader.py`). Saves are handed to the save
thread and `save` returns at once; `finished_saves` tells vLLM when a finished
request's blocks may be freed. Loads from a peer instance are asynchronous
(`peers.PeerLoads`): fetched on a background thread and scattered into the
paged cache on the model-runner thread in `finished_loads`. Once per step vLLM
collects this worker's statistics (`take_stats`) and, with KV events on, its
chunk events (`take_events`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lmc_connector.affinity import threads_on_every_cpu
from lmc_connector.cache import CacheEngine, ChunkLayout
from lmc_connector.cache.layout import dtype_name
from lmc_connector.config import CacheConfig
from lmc_connector.control.wire.security import ChannelSecurity, worker_security
from lmc_connector.ops.paged import KVFormat, PagedKV
from lmc_connector.v1.events import ChunkEventBuffer, LMCKVEvents
from lmc_connector.v1.loader import ChunkLoader
from lmc_connector.v1.lookup import LookupServer, PinRegistry
from lmc_connector.v1.lookup_addresses import LookupHandshake, host_identity
from lmc_connector.v1.metadata import LMCConnectorMetadata, LoadSpec
from lmc_connector.v1.peers import PeerLoads
from lmc_connector.v1.saver import ChunkSaver, SaveJob
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
    #: Tokens per scheduler block (block ids in the metadata count these), from the KV spec.
    block_size: int
    #: IPC address the lookup server binds.
    lookup_address: str
    #: vLLM publishes KV events (`--kv-events-config`): rank 0 reports its chunk events.
    kv_events: bool = False
    #: vLLM's KV cache type (`--kv-cache-dtype`): part of the key namespace.
    cache_dtype: str = "auto"
    #: The model's revision and quantization, where set: part of the key namespace.
    model_variant: str = ""


class LMCWorker:
    """Owns this rank's cache engine, the view of vLLM's paged KV cache, the loader, the save
    thread, the lookup server, the control agent and peer loads. Hooks run on vLLM's
    model-runner thread; the others run on their own threads over the (thread-safe) engine.

    Construct, `register_kv_caches` (starts serving), `close`.
    """

    def __init__(self, config: CacheConfig, settings: WorkerSettings) -> None:
        self.config = config
        self.settings = settings
        self.engine: CacheEngine | None = None
        self.paged: PagedKV | None = None
        self.pins: PinRegistry | None = None
        self.saver: ChunkSaver | None = None
        self._loader: ChunkLoader | None = None
        #: Requests that had saves handed to the save thread, and those of them vLLM finished
        #: (reported back in `finished_saves` once their saves are done).
        self._saving: set[str] = set()
        self._finishing: set[str] = set()
        self._server: LookupServer | None = None
        self._agent: ControlAgent | None = None
        self._peer_loads: PeerLoads | None = None
        self._load_errors: set[int] = set()
        self._stats = LMCConnectorStats()
        self._usage_due = 0.0
        self._events: ChunkEventBuffer | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def register_kv_caches(
        self, kv_caches: Mapping[str, torch.Tensor], fmt: KVFormat, backend: str = ""
    ) -> None:
        """Work out the chunk layout from vLLM's per-layer views, open the cache, start serving."""
        paged = PagedKV(list(kv_caches.values()), fmt, self.settings.block_size)
        if self.config.chunk_size % paged.align:
            raise ValueError(
                f"chunk_size={self.config.chunk_size} must be a multiple of the KV block size "
                f"{paged.align} for the {fmt.value} layout: set chunk_size accordingly"
            )
        layout = ChunkLayout(
            model=self.settings.model,
            world_size=self.settings.world_size,
            rank=self.settings.rank,
            dtype=dtype_name(paged.dtype),
            planes=paged.planes,
            layers=len(paged.layers),
            channels=paged.channels,
            chunk_size=self.config.chunk_size,
            cache_dtype=self.settings.cache_dtype,
            backend=backend,
            variant=self.settings.model_variant,
        )
        self.paged = paged
        self.engine = CacheEngine(self.config, layout, device=paged.device)
        # This runs on vLLM's model-runner thread, which vLLM's CPU worker binds to one core:
        # the threads started here (a shared store's writer, the save thread, the servers)
        # would inherit that core (see `affinity`).
        with threads_on_every_cpu():
            self.engine.open()
        started = time.perf_counter()
        warmed = self.engine.prefill_buffers()
        logger.info(
            "rank %d: %.0f MiB of chunk buffers touched in %.2f s (first loads fill warm memory)",
            self.settings.rank, warmed / 2**20, time.perf_counter() - started,
        )  # fmt: skip
        tiers = ", ".join(
            f"{name} {u.used_bytes / 1e9:.2f}/{u.capacity_bytes / 1e9:.2f} GB ({u.chunks} chunks)"
            for name, u in self.engine.usage().items()
        )
        logger.info(
            "lmc_connector worker %d/%d: %d layers, %s (%s, %s), %d kv heads x %d, block %d; "
            "tiers: %s",
            self.settings.rank,
            self.settings.world_size,
            layout.layers,
            fmt.value,
            backend or "unknown backend",
            self.settings.cache_dtype,
            paged.heads,
            paged.plane_width,
            paged.kernel_block_size,
            tiers,
        )
        if self.settings.kv_events and self.settings.rank == 0:
            self._events = ChunkEventBuffer({t.name: t.event_medium for t in self.engine.tiers})
            self.engine.subscribe(self._events)
        self._loader = ChunkLoader(self.engine, paged, self.engine.codec_device)
        with threads_on_every_cpu():
            self._start_threads(self.engine, paged)

    def _start_threads(self, engine: CacheEngine, paged: PagedKV) -> None:
        """Start the save thread, the lookup server and (`enable_controller`) the agent."""
        self.saver = ChunkSaver(engine, paged, self.config.save_queue_chunks)
        self.saver.start()
        self.pins = PinRegistry(engine)
        # One security for every channel of this worker that can leave the host.
        security = worker_security(self.config)
        self._server = LookupServer(
            self.settings.lookup_address, self.pins, self.reset, self.config.lookup_host, security
        )
        self._server.start()
        if self.config.enable_controller:
            self._start_agent(engine, security)

    def _start_agent(self, engine: CacheEngine, security: ChannelSecurity) -> None:
        from lmc_connector.control.agent.agent import ControlAgent

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

    def handshake(self) -> LookupHandshake | None:
        """Where this worker's lookup server listens, for the scheduler (None before start)."""
        if self._server is None:
            return None
        return LookupHandshake(host_identity(), self._server.address, self._server.tcp_address)

    def drain_saves(self) -> None:
        """Finish every queued save (before vLLM puts the KV cache to sleep)."""
        if self.saver is not None and not self.saver.drain():
            logger.error("saves still pending before the KV cache sleeps; they may be lost")

    def close(self) -> None:
        if self.saver is not None:
            self.saver.close()
        if self._loader is not None:
            self._loader.close()
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

    def before_forward(self, meta: LMCConnectorMetadata) -> None:
        """Release what preempted requests' saves still read: their blocks go to others."""
        if meta.preempted and self.saver is not None:
            self.saver.cancel(set(meta.preempted))

    def start_load(self, meta: LMCConnectorMetadata) -> None:
        """Scatter every local load of this step into the paged cache before the forward;
        start the fetches of loads from a peer instance."""
        local = []
        for spec in meta.loads:
            if spec.peers and self._peer_loads is not None:
                self._peer_loads.submit(spec)
            else:
                local.append(spec)
        if not local:
            return
        tables = self._tables([spec.block_ids for spec in local], on_device=True)
        for spec, table in zip(local, tables, strict=True):
            started = time.perf_counter()
            try:
                self._load(spec, table)
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
                    self._load(spec, self._tables([spec.block_ids], on_device=True)[0])
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

    def _load(self, spec: LoadSpec, table: torch.Tensor) -> None:
        assert self._loader is not None, "load before register_kv_caches"
        try:
            loaded = self._loader.load(spec, table)
        except Exception:
            # Boundary of vLLM's load path: the tokens are recomputed, never served wrong.
            logger.exception("load of %s failed; its tokens will be recomputed", spec.req_id)
            loaded = spec.start
        if loaded < spec.end:
            self._fail_blocks(spec, loaded)

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
        """Hand the chunks this step completed to the save thread; returns at once."""
        # Every request with a save is reported in `finished_saves`, even if nothing could be
        # queued: the scheduler half holds its blocks until then.
        self._saving.update(spec.req_id for spec in meta.saves)
        saver, paged = self.saver, self.paged
        if saver is None or paged is None or not meta.saves:
            return
        started = time.perf_counter()
        ready = None
        if paged.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        tables = self._tables([spec.block_ids for spec in meta.saves], on_device=False)
        for spec, table in zip(meta.saves, tables, strict=True):
            jobs = [
                SaveJob(spec.req_id, key, start, paged.aligned(end), table, ready)
                for key, (start, end) in zip(spec.keys, spec.bounds, strict=True)
            ]
            saver.submit(jobs)
        seconds = time.perf_counter() - started
        self._stats.observe("save_seconds", seconds)
        saver.stats.handoff_steps += 1
        saver.stats.handoff_seconds += seconds

    def finished_saves(self, finished_req_ids: set[str]) -> set[str]:
        """Of the requests vLLM finished (now or earlier) whose blocks it holds for our saves,
        those whose saves are all done: vLLM may now free their blocks."""
        self._finishing |= finished_req_ids & self._saving
        if not self._finishing:
            return set()
        done = self._finishing if self.saver is None else self.saver.done_requests(self._finishing)
        self._finishing -= done
        self._saving -= done
        return done

    def reset(self, shared: bool) -> int:
        """Empty this rank's cache (vLLM's cache reset, relayed by the scheduler); returns
        the chunk entries removed. Runs on the lookup server thread."""
        engine = self.engine
        if engine is None:
            return 0
        if self.saver is not None:
            self.saver.drain()  # a save still in flight would survive the reset
        removed = engine.reset(shared or self.config.reset_shared_store)
        logger.info("rank %d: cache reset, %d chunk entries removed", self.settings.rank, removed)
        return removed

    def take_stats(self) -> LMCConnectorStats | None:
        """This rank's statistics since the last call (vLLM's worker thread, once per step)."""
        stats, self._stats = self._stats, LMCConnectorStats()
        engine = self.engine
        if engine is not None:
            with_tokens = self.settings.rank == 0
            taken = engine.ctx.stats.take()
            for tier, counts in taken.items():
                values = counts.as_dict()
                if not with_tokens:
                    values = {k: v for k, v in values.items() if not k.endswith("_tokens")}
                stats.add_tier(tier, values)
            now = time.monotonic()
            # Usage moves only with the counters: sample it when they moved (a background save
            # may land after the last step of a burst), else at most every USAGE_EVERY_S.
            if taken or now >= self._usage_due:
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

    def _tables(self, tables: Sequence[list[int]], on_device: bool) -> list[torch.Tensor]:
        """The block tables of a step as long tensors, with one transfer to the device."""
        assert self.paged is not None
        flat = torch.tensor([b for table in tables for b in table], dtype=torch.long)
        if on_device and self.paged.device.type != "cpu":
            flat = flat.pin_memory().to(self.paged.device, non_blocking=True)
        return list(flat.split([len(table) for table in tables]))
