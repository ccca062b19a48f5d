"""This cache's chunks in vLLM's KV events (`--kv-events-config`), for prefix-aware routers.

A chunk entering a tier is published as `BlockStored`, a chunk leaving it as
`BlockRemoved`, with the tier's medium (`CPU` for LocalCPUBackend, `STORAGE`
for LocalDiskBackend; `Tier.event_medium`). What the events carry:

* `block_hashes`: this cache's chunk keys (one per event), not vLLM's block
  hashes. A chunk key is a stable 64-bit hash chained over whole chunks of
  `chunk_size` tokens, the same in every process, rank and restart, and the
  key the controller's `/lookup` index uses. A router treats it as an opaque
  id: it learns the tokens behind it from `BlockStored` and forgets them on
  `BlockRemoved`.
* `parent_block_hash`: the previous chunk's key (None for a prompt's first).
* `token_ids`: the chunk's tokens and `block_size` = `chunk_size`, so a router
  that hashes token ids itself (as llm-d's and Dynamo's routers do) can match
  its own prefixes. A chunk whose tokens the scheduler no longer remembers
  (a bounded table) or a trailing partial chunk is published as vLLM's own
  offloading connector publishes a chunk it cannot describe: `token_ids=[]`
  and `block_size=0`, which consumers skip.

Flow: the worker half of rank 0 subscribes a `ChunkEventBuffer` to its cache
(every rank saves and evicts the same chunks; a rank that diverges shows as a
miss in lookups, never as wrong KV) and hands the buffered events to vLLM once
per step (`get_kv_connector_kv_cache_events`); vLLM passes them to the
scheduler half (`update_connector_output`), whose `EventDescriber` fills in
the tokens and returns them from `take_events`, which vLLM publishes on its
ZMQ endpoint with that step's batch.
"""

from __future__ import annotations

import logging
import threading
from array import array
from collections import OrderedDict
from collections.abc import Mapping, Sequence

from vllm.distributed.kv_events import (
    BlockRemoved,
    BlockStored,
    KVCacheEvent,
    KVConnectorKVEvents,
)

from lmc_connector.throttle import Throttle
from lmc_connector.tokens import ChunkKey

logger = logging.getLogger(__name__)

#: Chunk keys buffered between two engine steps; beyond it events are dropped (and counted):
#: a router then misses them until the chunks change again.
MAX_BUFFERED_KEYS = 200_000
#: Tokens of prompt chunks the scheduler remembers to describe stored chunks (4 bytes each).
MAX_REMEMBERED_TOKENS = 4_000_000
DROP_LOG_EVERY_S = 30.0


class LMCKVEvents(KVConnectorKVEvents):
    """KV events of one step as vLLM carries them from the workers to the scheduler."""

    def __init__(self, events: list[KVCacheEvent] | None = None, num_workers: int = 1) -> None:
        self._events: list[KVCacheEvent] = list(events or [])
        self._num_workers = num_workers

    def add_events(self, events: list[KVCacheEvent]) -> None:
        self._events.extend(events)

    def aggregate(self) -> LMCKVEvents:
        return self

    def increment_workers(self, count: int = 1) -> None:
        self._num_workers += count

    def get_all_events(self) -> list[KVCacheEvent]:
        return list(self._events)

    def get_number_of_workers(self) -> int:
        return self._num_workers

    def clear_events(self) -> None:
        self._events.clear()


def _stored(key: ChunkKey, medium: str) -> BlockStored:
    """A chunk arrived in `medium`, as the worker knows it: no tokens yet."""
    return BlockStored(
        block_hashes=[key],
        parent_block_hash=None,
        token_ids=[],
        block_size=0,
        lora_id=None,
        medium=medium,
        lora_name=None,
    )


class ChunkEventBuffer:
    """Owns the chunk events of one worker's cache not yet handed to vLLM, as vLLM events.

    A `CacheEventSink`: the cache calls it under its lock from any thread (it
    only appends); vLLM's worker thread calls `take` once per step. `media`
    maps a location to its event medium (None: not published).
    """

    def __init__(self, media: Mapping[str, str | None]) -> None:
        self._media = dict(media)
        self._lock = threading.Lock()
        self._events: list[KVCacheEvent] = []
        self._keys = 0
        self.dropped = 0
        self._drops = Throttle(DROP_LOG_EVERY_S)

    def chunks_admitted(self, location: str, keys: Sequence[ChunkKey]) -> None:
        medium = self._media.get(location)
        if medium is not None:
            self._add([_stored(key, medium) for key in keys], len(keys))

    def chunks_evicted(self, location: str, keys: Sequence[ChunkKey]) -> None:
        medium = self._media.get(location)
        if medium is not None:
            self._add([BlockRemoved(block_hashes=list(keys), medium=medium)], len(keys))

    def _add(self, events: list[KVCacheEvent], keys: int) -> None:
        with self._lock:
            if self._keys + keys > MAX_BUFFERED_KEYS:
                self.dropped += keys
                if self._drops.ready():
                    logger.warning(
                        "KV events: %d chunk events dropped so far (no engine step took them)",
                        self.dropped,
                    )
                return
            self._events.extend(events)
            self._keys += keys

    def take(self) -> LMCKVEvents | None:
        """The events since the last call, or None."""
        with self._lock:
            if not self._events:
                return None
            events, self._events, self._keys = self._events, [], 0
        return LMCKVEvents(events)


class EventDescriber:
    """Owns what the scheduler remembers of prompt chunks (key -> parent key and tokens,
    bounded, oldest forgotten first) and the events waiting for `take`.

    Runs on vLLM's scheduler thread only.
    """

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        self._chunks: OrderedDict[ChunkKey, tuple[ChunkKey | None, array[int]]] = OrderedDict()
        self._tokens = 0
        self._ready: list[KVCacheEvent] = []

    def remember(self, keys: Sequence[ChunkKey], prompt: Sequence[int]) -> None:
        """Keep the tokens of every whole chunk of `prompt` (whose chunk keys are `keys`)."""
        size = self.chunk_size
        for i, key in enumerate(keys):
            tokens = prompt[i * size : (i + 1) * size]
            if len(tokens) < size:
                break
            if key in self._chunks:
                self._chunks.move_to_end(key)
                continue
            self._chunks[key] = (keys[i - 1] if i else None, array("I", tokens))
            self._tokens += size
        while self._tokens > MAX_REMEMBERED_TOKENS and self._chunks:
            self._chunks.popitem(last=False)
            self._tokens -= size

    def add(self, events: Sequence[KVCacheEvent]) -> None:
        """Events from the workers (vLLM's `update_connector_output`)."""
        for event in events:
            if isinstance(event, BlockStored):
                keys = [ChunkKey(int(k)) for k in event.block_hashes]
                self._ready.extend(self._describe(key, event) for key in keys)
            else:
                self._ready.append(event)

    def _describe(self, key: ChunkKey, event: BlockStored) -> BlockStored:
        known = self._chunks.get(key)
        if known is None:
            return _stored(key, event.medium or "")
        parent, tokens = known
        return BlockStored(
            block_hashes=[key],
            parent_block_hash=parent,
            token_ids=tokens.tolist(),
            block_size=self.chunk_size,
            lora_id=None,
            medium=event.medium,
            lora_name=None,
        )

    def take(self) -> list[KVCacheEvent]:
        events, self._ready = self._ready, []
        return events
