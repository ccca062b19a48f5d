"""Messages workers push to the controller's monitor port (PUSH -> PULL).

Schema evolution (msgspec rules): new fields go at the end with a default;
fields are never reordered, renamed or retyped; `array_like` structs only
ever append. `tests/control/wire/test_messages.py` decodes stored older bytes.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from lmc_connector.control.wire.codec import Decoder
from lmc_connector.control.wire.types import (
    CalibrationId,
    Host,
    InstanceId,
    Name,
    Port,
    Rank,
    WireChunkKey,
    WorldSize,
)
from lmc_connector.operations import JobOutcome

#: Locations a worker may report; a worker has a handful of tiers.
MAX_LOCATIONS = 16


class WorkerSpec(msgspec.Struct):
    """Who a worker is and where the controller reaches it.

    Sent in `Register`, kept by the controller, and shown (with liveness and
    usage) by the HTTP API. `session` is random per agent start, so a
    restarted worker is told apart from a late message of its previous life.
    """

    instance_id: InstanceId
    rank: Rank
    world_size: WorldSize
    session: str
    host: Host
    port: Port
    model: str
    chunk_size: Annotated[int, msgspec.Meta(ge=1)]
    locations: Annotated[list[Name], msgspec.Meta(max_length=MAX_LOCATIONS)]
    methods: Annotated[list[Name], msgspec.Meta(max_length=64)]
    pid: int = 0
    #: Where other instances fetch this worker's chunks (None: it serves no peers).
    peer_host: Host | None = None
    peer_port: Port | None = None
    #: What every rank of the instance shares (model, world size, dtype, shape, chunk size);
    #: only instances with the same fingerprint exchange chunks.
    layout: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    #: Methods (of `methods`) that compress only once a calibration exists (POST /calibrate).
    calibrated_methods: Annotated[list[Name], msgspec.Meta(max_length=64)] = []
    #: Method -> id of the calibration it encodes with, as the worker registered (loaded from
    #: its disk tier or the shared store); the controller adds those it fits later.
    calibrations: Annotated[dict[Name, CalibrationId], msgspec.Meta(max_length=64)] = {}

    @property
    def peer_address(self) -> str | None:
        """The worker's peer server as a ZMQ address, if it serves peers."""
        if self.peer_host is None or self.peer_port is None:
            return None
        return f"tcp://{self.peer_host}:{self.peer_port}"


class Register(WorkerSpec, tag=True):
    """An agent announces itself; the controller (re)creates the worker and forgets its chunks."""


class TierReport(msgspec.Struct, array_like=True):
    """One location's usage in a heartbeat."""

    chunks: Annotated[int, msgspec.Meta(ge=0)]
    used_bytes: Annotated[int, msgspec.Meta(ge=0)]
    capacity_bytes: Annotated[int, msgspec.Meta(ge=0)]


class Heartbeat(msgspec.Struct, tag=True, omit_defaults=True):
    """Sent every `controller_heartbeat_interval`; carries where to send a resync request."""

    instance_id: InstanceId
    rank: Rank
    session: str
    host: Host
    port: Port
    usage: Annotated[dict[Name, TierReport], msgspec.Meta(max_length=MAX_LOCATIONS)] = {}


class ChunkOp(msgspec.Struct, array_like=True, gc=False):
    """Chunk events of one kind: keys that entered (`admitted`) or left one location."""

    admitted: bool
    location: Name
    keys: list[WireChunkKey]


class ChunkEvents(msgspec.Struct, tag=True, gc=False):
    """A batch of chunk events of one worker, applied in order (the hot message)."""

    instance_id: InstanceId
    rank: Rank
    session: str
    ops: list[ChunkOp]


class Snapshot(msgspec.Struct, tag=True, gc=False):
    """Every key the worker holds per location; replaces what the controller knew."""

    instance_id: InstanceId
    rank: Rank
    session: str
    locations: Annotated[dict[Name, list[WireChunkKey]], msgspec.Meta(max_length=MAX_LOCATIONS)]


class JobDone(msgspec.Struct, tag=True):
    """A worker's background part of an operation ended; `outcome.errors` non-empty = failed."""

    instance_id: InstanceId
    rank: Rank
    session: str
    event_id: str
    outcome: JobOutcome


class Deregister(msgspec.Struct, tag=True):
    """The agent is closing; the controller drops the worker and its chunks at once."""

    instance_id: InstanceId
    rank: Rank
    session: str


WorkerMessage = Register | Heartbeat | ChunkEvents | Snapshot | JobDone | Deregister


def worker_message_decoder() -> Decoder[WorkerMessage]:
    return Decoder(WorkerMessage, "worker")
