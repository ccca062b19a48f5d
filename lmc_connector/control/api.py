"""JSON bodies of the controller's HTTP API (msgspec Structs; also the OpenAPI schemas).

Field names follow the seed (`compress.md`) and LMCache's controller API.
Decoding rejects unknown types and out-of-range token ids, naming the field.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from lmc_connector.control.events import Event, WorkerPart
from lmc_connector.control.messages import TokenId

Tokens = Annotated[list[TokenId], msgspec.Meta(description="token ids of the prompt")]


class TransformRequest(msgspec.Struct, forbid_unknown_fields=True):
    instance_id: str
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
    instance_id: str
    tokens: Tokens
    location: str | None = None


class UnpinRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Release the pins of a cached prefix in every location: a pin belongs to the chunk,
    not to a tier. `location` is accepted (LMCache's API sends it) and ignored."""

    instance_id: str
    tokens: Tokens
    location: str | None = None


class ClearRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Clear one location of the instance, or every location when `location` is omitted."""

    instance_id: str
    location: str | None = None


class ClearResponse(msgspec.Struct):
    """Chunk entries summed over the instance's workers; pinned chunks are kept."""

    event_id: str
    removed: int
    kept_pinned: int


class MoveRequest(msgspec.Struct, forbid_unknown_fields=True):
    instance_id: str
    source: str
    destination: str
    tokens: Tokens


class CheckFinishRequest(msgspec.Struct, forbid_unknown_fields=True):
    event_id: str


class HealthRequest(msgspec.Struct, forbid_unknown_fields=True):
    instance_id: str | None = None


class WorkerInfo(msgspec.Struct):
    instance_id: str
    worker_id: int
    address: str
    pid: int
    model: str
    chunk_size: int
    locations: list[str]
    methods: list[str]
    last_heartbeat_age_s: float
    registered_age_s: float
    #: location -> {"chunks": indexed chunk count, "used_bytes", "capacity_bytes"}
    usage: dict[str, dict[str, int]]


class HealthResponse(msgspec.Struct):
    """`error_codes`: worker_id -> 0 (heartbeating) or 1 (missing); empty without instance_id."""

    event_id: str
    status: Literal["ok", "degraded"]
    instances: int
    workers: int
    indexed_chunks: int
    error_codes: dict[int, int] = {}


class WorkerInfoRequest(msgspec.Struct, forbid_unknown_fields=True):
    instance_id: str
    worker_ids: list[int] | None = None


class WorkerInfoResponse(msgspec.Struct):
    event_id: str
    worker_infos: list[WorkerInfo]


class InstanceInfo(msgspec.Struct):
    instance_id: str
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
    "Event",
    "HealthRequest",
    "HealthResponse",
    "InstanceInfo",
    "InstancesResponse",
    "LookupRequest",
    "LookupResponse",
    "MoveRequest",
    "PinRequest",
    "ScheduledResponse",
    "TransformRequest",
    "UnpinRequest",
    "WorkerInfo",
    "WorkerInfoRequest",
    "WorkerInfoResponse",
    "WorkerPart",
]
