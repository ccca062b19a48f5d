"""JSON bodies of the controller's HTTP API (msgspec Structs; also the OpenAPI schemas).

Field names follow the seed (`compress.md`) and LMCache's controller API.
Decoding rejects unknown fields and out-of-range token ids, naming the field.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from lmc_connector.control.controller.operations import Operation, OperationPart
from lmc_connector.control.wire.monitor import WorkerSpec
from lmc_connector.control.wire.types import (
    MAX_WORLD_SIZE,
    InstanceId,
    PromptScope,
    ScopeText,
    TokenId,
)

Tokens = Annotated[list[TokenId], msgspec.Meta(description="token ids of the prompt")]
CacheSalt = Annotated[
    ScopeText,
    msgspec.Meta(description="the cache_salt the prompt was sent to vLLM with (tenant isolation)"),
]
LoraName = Annotated[
    ScopeText,
    msgspec.Meta(description="the LoRA adapter the prompt was served with (its model name)"),
]
LoraPath = Annotated[
    ScopeText, msgspec.Meta(description="that adapter's path, as given in --lora-modules")
]


class ScopedTokens(msgspec.Struct, kw_only=True):
    """Fields naming what besides `tokens` keyed the prompt's KV, all optional.

    vLLM keys a prompt's KV by its tokens and, when given, the request's
    `cache_salt` and LoRA adapter; this cache does the same, so a prompt cached
    under a salt or an adapter is found only when the body names it too.
    """

    cache_salt: CacheSalt | None = None
    lora_name: LoraName | None = None
    lora_path: LoraPath | None = None

    def scope(self) -> PromptScope | None:
        if self.cache_salt is None and self.lora_name is None and self.lora_path is None:
            return None
        return PromptScope(self.cache_salt, self.lora_name, self.lora_path)


class TransformRequest(ScopedTokens, forbid_unknown_fields=True):
    """Without `tokens` (absent or null), every chunk of the instance in `location`."""

    instance_id: InstanceId
    method: str
    location: str
    tokens: Tokens | None = None


class CalibrateRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Fit a calibration of `method` on each worker of the instance, on KV it has cached."""

    instance_id: InstanceId
    method: str = "kvtc"


class ScheduledResponse(msgspec.Struct):
    """`num_tokens`: tokens scheduled, the minimum over the instance's workers."""

    event_id: str
    num_tokens: int


class LookupRequest(ScopedTokens, forbid_unknown_fields=True):
    tokens: Tokens


class LookupResponse(msgspec.Struct):
    """`layout_info`: instance_id -> [location, cached prefix tokens], for instances with a hit."""

    event_id: str
    layout_info: dict[str, tuple[str, int]]


class PinRequest(ScopedTokens, forbid_unknown_fields=True):
    instance_id: InstanceId
    tokens: Tokens
    location: str | None = None


class UnpinRequest(ScopedTokens, forbid_unknown_fields=True):
    """Release the pins of a cached prefix in every location: a pin belongs to the chunk,
    not to a tier. `location` is accepted (LMCache's API sends it) and ignored."""

    instance_id: InstanceId
    tokens: Tokens
    location: str | None = None


class ClearRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Clear one location of the instance, or every location when `location` is omitted."""

    instance_id: InstanceId
    location: str | None = None


class ClearResponse(msgspec.Struct, kw_only=True):
    """`num_tokens`: tokens whose chunks were removed (the minimum over the instance's
    workers); `removed`, `kept_pinned`: chunk entries summed over the workers."""

    event_id: str
    num_tokens: int
    removed: int
    kept_pinned: int


#: (instance_id, location), as LMCache's `/move` names a place.
Position = tuple[InstanceId, str]


class MoveRequest(ScopedTokens, forbid_unknown_fields=True):
    """Either shape, not both:

    * within one instance: `{instance_id, source, destination, tokens}` (CPU <-> disk);
    * LMCache's, across instances: `{old_position: [instance_id, location], new_position:
      [instance_id, location], tokens, should_copy}`; the destination pulls the prefix from
      the source, rank for rank, and without `should_copy` the source drops it afterwards
      (`copy` is accepted as LMCache's older name). Tracked like compress.

    `cache_salt`, `lora_name` and `lora_path` name a scoped prompt, in either shape.
    """

    tokens: Tokens
    instance_id: InstanceId | None = None
    source: str | None = None
    destination: str | None = None
    old_position: Position | None = None
    new_position: Position | None = None
    should_copy: bool | None = None
    copy: bool | None = None


class CheckFinishRequest(msgspec.Struct, forbid_unknown_fields=True):
    event_id: str


class HealthRequest(msgspec.Struct, forbid_unknown_fields=True):
    instance_id: str | None = None


class TierUsage(msgspec.Struct):
    """One location of a worker: chunks the controller indexed, bytes the worker reported."""

    chunks: int
    used_bytes: int
    capacity_bytes: int


class WorkerInfo(WorkerSpec, kw_only=True):
    """A worker as it registered (`WorkerSpec`), with liveness and usage.

    `worker_id`, `ip`, `port`, `peer_init_url`, `registration_time` and
    `last_heartbeat_time` (seconds since the epoch) and `key_count` (chunks
    indexed, every location) are LMCache's names.
    """

    worker_id: int
    address: str
    last_heartbeat_age_s: float
    registered_age_s: float
    usage: dict[str, TierUsage]
    ip: str
    #: host:port other instances fetch this worker's chunks from (None: no peer server).
    peer_init_url: str | None = None
    registration_time: float
    last_heartbeat_time: float
    key_count: int


class HealthResponse(msgspec.Struct):
    """`error_codes`: worker_id -> 0 (heartbeating) or 1 (missing); empty without instance_id.

    `problems` names what makes the status `degraded` (missing ranks, a dead internal thread).
    """

    event_id: str
    status: Literal["ok", "degraded"]
    instances: int
    workers: int
    indexed_chunks: int
    error_codes: dict[int, int] = {}
    problems: list[str] = []


class WorkerInfoRequest(msgspec.Struct, forbid_unknown_fields=True):
    instance_id: InstanceId
    worker_ids: Annotated[list[int], msgspec.Meta(max_length=MAX_WORLD_SIZE)] | None = None


class WorkerInfoResponse(msgspec.Struct):
    event_id: str
    worker_infos: list[WorkerInfo]


class WorkerListResponse(msgspec.Struct):
    """`GET /controller/workers` (LMCache's shape)."""

    workers: list[WorkerInfo]
    total_count: int


class QueryInstanceRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Which instance has a worker at `ip`; `event_id` is LMCache's (echoed when given)."""

    ip: Annotated[str, msgspec.Meta(max_length=255)]
    event_id: str | None = None


class QueryInstanceResponse(msgspec.Struct):
    """`res`: the instance with a worker at that address (LMCache's name); `instance_ids`:
    every such instance, when several share a host."""

    event_id: str
    res: str
    instance_ids: list[str]


class InstanceInfo(msgspec.Struct):
    instance_id: InstanceId
    model: str
    world_size: int
    chunk_size: int
    locations: list[str]
    methods: list[str]
    indexed_chunks: int
    workers: list[WorkerInfo]


class InstancesResponse(msgspec.Struct):
    instances: list[InstanceInfo]


class OperationsResponse(msgspec.Struct):
    """The newest operations: those in progress first, then the last ended, newest first."""

    operations: list[Operation]


class ErrorResponse(msgspec.Struct):
    detail: str
    event_id: str | None = None


__all__ = [
    "CalibrateRequest",
    "CheckFinishRequest",
    "ClearRequest",
    "ClearResponse",
    "ErrorResponse",
    "HealthRequest",
    "HealthResponse",
    "InstanceInfo",
    "InstancesResponse",
    "LookupRequest",
    "LookupResponse",
    "MoveRequest",
    "Operation",
    "OperationPart",
    "OperationsResponse",
    "PinRequest",
    "QueryInstanceRequest",
    "QueryInstanceResponse",
    "ScheduledResponse",
    "ScopedTokens",
    "TierUsage",
    "TransformRequest",
    "UnpinRequest",
    "WorkerInfo",
    "WorkerInfoRequest",
    "WorkerInfoResponse",
    "WorkerListResponse",
]
