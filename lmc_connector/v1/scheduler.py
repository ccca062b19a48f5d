"""The scheduler half: lookups, per-request tracking, and each step's load/save plan.

Runs in vLLM's engine-core process on the scheduler thread; all methods are
called from that thread. The cache itself lives in the worker processes and
is asked through `LookupClient` (a timeout means no hit); the same channel
relays vLLM's cache reset. Chunk keys are computed here, once per request
(with the request's adapter, images and salt, `tokens.KeyScope`), and travel
to the workers in the metadata: one place hashes. Also keeps the scheduler's share of the
connector's statistics and turns the workers' chunk events into vLLM's KV
events (`v1/events.py`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from vllm.distributed.kv_events import KVCacheEvent
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from lmc_connector import tokens as tok
from lmc_connector.tokens import ChunkKey, KeyScope
from lmc_connector.v1.events import EventDescriber
from lmc_connector.v1.lookup import LookupClient
from lmc_connector.v1.metadata import LMCConnectorMetadata, LoadSpec, SaveSpec
from lmc_connector.v1.peers import PeerLocator
from lmc_connector.v1.stats import LMCConnectorStats

logger = logging.getLogger(__name__)

#: Seconds every worker has to empty its cache when vLLM resets it (a disk tier deletes files).
RESET_TIMEOUT_S = 120.0


def _hit_source(value: str) -> CacheHitSource:
    try:
        return CacheHitSource(value)
    except ValueError:
        return CacheHitSource.EXTERNAL_UNSPECIFIED


@dataclass(slots=True)
class RequestTracker:
    """What the scheduler half knows about one unfinished request."""

    req_id: str
    prompt_len: int
    #: Chained chunk keys of the prompt (the last chunk may be partial).
    keys: list[ChunkKey]
    #: Chunks [0, saved_chunks) are known to be in the cache (hit or saved by us).
    saved_chunks: int = 0
    #: The vLLM-computed prefix the last lookup was relative to.
    lookup_base: int = 0
    #: Tokens [load[0], load[1]) must be loaded in the next step this request is scheduled.
    load: tuple[int, int] | None = None
    #: Workers may hold lookup pins for this request (released by a load or an unpin).
    pinned: bool = False
    #: Saves were planned: the workers copy them in the background, so the request's blocks
    #: are released only once they report it (see `finished`).
    saving: bool = False
    block_ids: list[int] = field(default_factory=list)
    #: Where the last lookup's hit chunks are: runs of (vLLM cache-hit source, chunks).
    sources: list[tuple[str, int]] = field(default_factory=list)
    #: Peer server per rank of the instance the next load fetches from (empty: local load).
    peers: list[str] = field(default_factory=list)
    #: The instance `peers` belong to.
    peer_instance: str | None = None
    #: The instance a load of this request fetched from; a request fetches once at most, so
    #: a peer that fails it leaves the request to be recomputed, not retried.
    fetched_from: str | None = None


class LMCScheduler:
    """Answers vLLM's scheduler hooks: owns the tracker of every unfinished request and the
    lookup client to this engine's workers. Runs on vLLM's scheduler thread only.

    With a `locator` (enable_p2p), a prefix that another instance holds beyond the local
    hit is loaded asynchronously from that instance's workers.

    Construct, `start`, `close`.
    """

    def __init__(
        self,
        chunk_size: int,
        block_size: int,
        client: LookupClient,
        events: EventDescriber | None = None,
        locator: PeerLocator | None = None,
    ) -> None:
        self.chunk_size = chunk_size
        self.block_size = block_size
        self._client = client
        self._locator = locator
        self._requests: dict[str, RequestTracker] = {}
        #: Describes the workers' chunk events for vLLM's KV events; None when they are off.
        self._events = events
        self._stats = LMCConnectorStats()
        #: Requests whose asynchronous (peer) load is planned but not yet sent to the workers.
        self._fetches: list[str] = []
        #: Finished requests whose blocks vLLM holds until the workers report their saves.
        self._releasing: set[str] = set()

    def start(self) -> None:
        self._client.start()
        if self._locator is not None:
            self._locator.start()

    def close(self) -> None:
        self._client.close()
        if self._locator is not None:
            self._locator.close()

    @property
    def requests(self) -> dict[str, RequestTracker]:
        return self._requests

    def num_new_matched_tokens(
        self,
        req_id: str,
        prompt: Sequence[int] | None,
        num_computed_tokens: int,
        scope: KeyScope | None = None,
    ) -> tuple[int, bool]:
        """Tokens beyond `num_computed_tokens` loadable from the cache, leaving one to compute,
        and whether they load asynchronously (from a peer instance).

        `scope` (the request's adapter, images and salt) is hashed into its keys.
        Pins the hit chunks on every worker; a repeated call for the same
        request replaces its pins instead of adding to them.
        """
        if not prompt:
            return 0, False
        tracker = self._requests.get(req_id)
        if tracker is None:
            keys = tok.chunk_hashes(prompt, self.chunk_size, scope)
            tracker = RequestTracker(req_id, len(prompt), keys)
            self._requests[req_id] = tracker
            if self._events is not None:
                self._events.remember(keys, prompt)
        started = time.perf_counter()
        hit, tracker.sources = self._client.lookup(req_id, tracker.keys, tracker.prompt_len)
        self._stats.observe("lookup_seconds", time.perf_counter() - started)
        self._stats.count("lookups")
        tracker.saved_chunks = max(tracker.saved_chunks, -(-hit // self.chunk_size))
        tracker.lookup_base = num_computed_tokens
        tracker.peers = []
        loadable = tracker.prompt_len - 1
        if self._locator is not None and tracker.fetched_from is None and hit < loadable:
            found = self._locator.find(tracker.keys, -(-hit // self.chunk_size))
            if found is not None:
                peer_hit = tok.prefix_tokens(found.chunks, tracker.prompt_len, self.chunk_size)
                if min(peer_hit, loadable) > max(hit, num_computed_tokens):
                    hit, tracker.peers = peer_hit, list(found.addresses)
                    tracker.peer_instance = found.instance_id
                    tracker.sources = [(CacheHitSource.P2P.value, found.chunks)]
        extra = max(0, min(hit, loadable) - num_computed_tokens)
        # Ranks that found more than the minimum pinned their chunks too: keep the pins only
        # while a load may use them.
        tracker.pinned = extra > 0
        if not tracker.pinned:
            self._client.unpin(req_id)
            tracker.peers = []
        return extra, bool(tracker.peers)

    def transfers_done(self, received: set[str], failed_blocks: set[int]) -> None:
        """Workers report loads from peers ended; a load with blocks that did not arrive
        makes its peer instance one to avoid for a while (a miss for everyone)."""
        if self._locator is None or not failed_blocks:
            return
        for req_id in received:
            tracker = self._requests.get(req_id)
            if (
                tracker is not None
                and tracker.fetched_from
                and failed_blocks & set(tracker.block_ids)
            ):
                self._locator.avoid(tracker.fetched_from)

    def after_alloc(self, req_id: str, num_external_tokens: int, block_ids: list[int]) -> None:
        """vLLM allocated blocks for the request; `block_ids` are all of them so far."""
        tracker = self._requests.get(req_id)
        if tracker is None or num_external_tokens <= 0:
            return
        start = tracker.lookup_base
        tracker.load = (start, start + num_external_tokens)
        self._stats.count("lookup_hits")
        self._stats.count("hit_tokens", num_external_tokens)
        if tracker.peers:
            # Parked by vLLM until the workers report the KV received: plan the load now.
            tracker.block_ids = list(block_ids)
            tracker.fetched_from = tracker.peer_instance
            self._fetches.append(req_id)

    def hit_sources(self, req_id: str, num_external_tokens: int) -> dict[CacheHitSource, int]:
        """The tokens of the planned load of `req_id` per cache-hit source (the tier that
        holds them: host, disk, ...), summing to `num_external_tokens`."""
        tracker = self._requests.get(req_id)
        if tracker is None or tracker.load is None or num_external_tokens <= 0:
            return {}
        start = tracker.load[0]
        end = start + num_external_tokens
        out: dict[CacheHitSource, int] = {}
        first = 0
        for value, chunks in tracker.sources:
            lo = max(start, first * self.chunk_size)
            hi = min(end, (first + chunks) * self.chunk_size)
            if hi > lo:
                source = _hit_source(value)
                out[source] = out.get(source, 0) + hi - lo
            first += chunks
        return out

    def build_meta(
        self,
        new_reqs: Sequence[tuple[str, int, list[int]]],
        cached_reqs: Sequence[tuple[str, int, list[int] | None, bool]],
        num_scheduled: dict[str, int],
        preempted: set[str],
    ) -> LMCConnectorMetadata:
        """The plan for one step.

        `new_reqs`: (req_id, num_computed_tokens, block_ids) of newly scheduled requests;
        `cached_reqs`: (req_id, num_computed_tokens, new block ids, resumed) of the others,
        where a resumed request's block ids replace the old ones.
        """
        meta = LMCConnectorMetadata(preempted=sorted(preempted))
        for req_id in self._fetches:
            tracker = self._requests.get(req_id)
            if tracker is not None and tracker.load is not None:
                meta.loads.append(self._load_spec(tracker, tracker.load))
        self._fetches = []
        for req_id in preempted - set(num_scheduled):
            # Its blocks are gone; a resumption brings new ones (and a fresh lookup).
            tracker = self._requests.get(req_id)
            if tracker is not None:
                tracker.block_ids = []
        for req_id, computed, block_ids in new_reqs:
            tracker = self._requests.get(req_id)
            if tracker is not None:
                tracker.block_ids = list(block_ids)
                self._plan(meta, tracker, computed + num_scheduled.get(req_id, 0))
        for req_id, computed, new_blocks, resumed in cached_reqs:
            tracker = self._requests.get(req_id)
            if tracker is None:
                continue
            if resumed:
                tracker.block_ids = list(new_blocks or [])
            elif new_blocks:
                tracker.block_ids.extend(new_blocks)
            self._plan(meta, tracker, computed + num_scheduled.get(req_id, 0))
        return meta

    def _plan(self, meta: LMCConnectorMetadata, tracker: RequestTracker, computed: int) -> None:
        if tracker.load is not None:
            meta.loads.append(self._load_spec(tracker, tracker.load))
        if tracker.saved_chunks == len(tracker.keys):
            return  # the whole prompt is cached: nothing to plan in decode steps
        size, prompt_len = self.chunk_size, tracker.prompt_len
        limit = min(computed, prompt_len)
        bounds = [
            (i * size, min((i + 1) * size, prompt_len))
            for i in range(tracker.saved_chunks, len(tracker.keys))
            if min((i + 1) * size, prompt_len) <= limit
        ]
        if bounds:
            first = tracker.saved_chunks
            meta.saves.append(
                SaveSpec(
                    tracker.req_id,
                    tracker.keys[first : first + len(bounds)],
                    bounds,
                    list(tracker.block_ids),
                )
            )
            tracker.saved_chunks = first + len(bounds)
            tracker.saving = True

    def take_stats(self) -> LMCConnectorStats | None:
        """The scheduler's statistics since the last call (lookups), or None."""
        if self._stats.is_empty():
            return None
        stats, self._stats = self._stats, LMCConnectorStats()
        return stats

    def add_events(self, events: Sequence[KVCacheEvent]) -> None:
        """Chunk events the workers handed to vLLM this step."""
        if self._events is not None:
            self._events.add(events)

    def take_events(self) -> list[KVCacheEvent]:
        return [] if self._events is None else self._events.take()

    def reset(self, shared: bool, timeout_s: float = RESET_TIMEOUT_S) -> bool:
        """Every worker empties its cache (`shared`: shared tiers too); True if all did."""
        return self._client.reset(shared, timeout_s)

    def _load_spec(self, tracker: RequestTracker, span: tuple[int, int]) -> LoadSpec:
        """The load of `span` for the workers; the tracker's pending load is consumed."""
        start, end = span
        first = start // self.chunk_size
        last = -(-end // self.chunk_size)
        spec = LoadSpec(
            tracker.req_id,
            tracker.keys[first:last],
            first,
            start,
            end,
            list(tracker.block_ids),
            tracker.peers,
        )
        tracker.load, tracker.pinned, tracker.peers = None, False, []
        return spec

    def finished(self, req_id: str) -> bool:
        """Forget the request and release pins a load did not consume (abort, no blocks).

        True when its blocks must stay allocated until every worker reports its
        background saves done (vLLM's delayed release, `get_finished`).
        """
        tracker = self._requests.pop(req_id, None)
        if tracker is None:
            return False
        if tracker.pinned:
            self._client.unpin(req_id)
        if tracker.saving:
            self._releasing.add(req_id)
        return tracker.saving

    def saves_reported(self, req_ids: set[str]) -> None:
        """Every worker reported these requests' saves done: vLLM frees their blocks now."""
        self._releasing -= req_ids

    @property
    def pending_block_frees(self) -> bool:
        """Blocks are about to come free (saves finishing), so vLLM may wait for them
        instead of preempting a request."""
        return bool(self._releasing)
