"""Per-step instructions from the scheduler half to every worker half.

Plain lists and ints only: vLLM ships the metadata to the worker processes
inside its scheduler output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from lmc_connector.tokens import ChunkKey


@dataclass(slots=True)
class LoadSpec:
    """Scatter tokens [start, end) of a request from cached chunks into its blocks.

    `keys` are the chunk keys from chunk index `first_chunk` on; chunk i covers
    tokens [i * chunk_size, (i + 1) * chunk_size). The worker drops its lookup
    pins for `req_id` once the load is done. With `peers` (one peer server address per
    rank) the load is asynchronous: each rank first fetches the chunks it lacks from its
    peer, and reports the request finished receiving when they are in its blocks.
    """

    req_id: str
    keys: list[ChunkKey]
    first_chunk: int
    start: int
    end: int
    block_ids: list[int]
    peers: list[str] = field(default_factory=list)


@dataclass(slots=True)
class SaveSpec:
    """Gather chunks of a request from its blocks (after this step's forward) and cache them.

    `keys[i]` covers tokens `bounds[i]`; the last chunk of a prompt may be partial. The
    worker copies them in the background and reports the request in `get_finished` once
    its saves are done (the scheduler half holds its blocks until then).
    """

    req_id: str
    keys: list[ChunkKey]
    bounds: list[tuple[int, int]]
    block_ids: list[int]


@dataclass
class LMCConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    #: Requests preempted this step: their blocks go to others, so their saves still queued
    #: are cancelled (and one in progress waited for) before the forward.
    preempted: list[str] = field(default_factory=list)
