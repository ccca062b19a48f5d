"""JSON bodies of the controller's HTTP API (msgspec Structs; also the OpenAPI schemas).

Field names follow the seed (`compress.md`) and LMCache's controller API.
Decoding rejects unknown fields and out-of-range token ids, naming the field.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from lmc_connector.control.controller.operations import Operation, OperationPart
from lmc_connector.control.wire.monitor import WorkerSpec
from lmc_connector.control.wire.types import MAX_WORLD_SIZE, InstanceId, TokenId

Tokens = Annotated[list[TokenId], msgspec.Meta(description="token ids of the prompt")]


class TransformRequest(msgspec.Struct, forbid_unknown_fields=True):
    instance_id: InstanceId
    method: str
    location: str
    tokens: Tokens


class ScheduledResponse(msgspec.Struct):
    """`num_tokens`: tokens scheduled, the minimum over the instance's workers."""

    event_id: str
    num_tokens: int


class LookupRequest(msgspec.Struct, forbid_unknown_fields=True):
    tokens: Tokens


class LookupResponse(msgspec.Struct):
    """`layout_info`: instance_id -> [location, cached prefix tokens], for instances with a hit."""

    event_id: str
    layout_info: dict[str, tuple[str, int]]


class PinRequest(msgspec.Struct, forbid_unknown_fields=True):
    instance_id: InstanceId
    tokens: Tokens
    location: str | None = None


class UnpinRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Release the pins of a cached prefix in every location: a pin belongs to the chunk,
    not to a tier. `location` is accepted (LMCache's API sends it) and ignored."""

    instance_id: InstanceId
    tokens: Tokens
    location: str | None = None


class ClearRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Clear one location of the instance, or every location when `location` is omitted."""

    instance_id: InstanceId
    location: str | None = None


class ClearResponse(msgspec.Struct):
    """Chunk entries summed over the instance's workers; pinned chunks are kept."""

    event_id: str
    removed: int
    kept_pinned: int


class MoveRequest(msgspec.Struct, forbid_unknown_fields=True):
    instance_id: InstanceId
    source: str
    destination: str
    tokens: Tokens


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
    """A worker as it registered (`WorkerSpec`), with liveness and usage."""

    worker_id: int
    address: str
    last_heartbeat_age_s: float
    registered_age_s: float
    usage: dict[str, TierUsage]


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


class ErrorResponse(msgspec.Struct):
    detail: str
    event_id: str | None = None


__all__ = [
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
    "PinRequest",
    "ScheduledResponse",
    "TierUsage",
    "TransformRequest",
    "UnpinRequest",
    "WorkerInfo",
    "WorkerInfoRequest",
    "WorkerInfoResponse",
]
