"""Every message between the controller and the in-worker agents, msgpack on the wire.

One tagged union per socket direction, one reused typed decoder per socket:

* `WorkerMessage`: agent PUSH -> controller PULL (`controller_pull_url`, the
  controller's `--monitor-port`): register, heartbeat, chunk events,
  snapshots, job completions, deregister.
* `Command`: controller DEALER -> agent ROUTER (`lmcache_worker_ports[rank]`).
* `Reply`: agent ROUTER -> controller DEALER, matched by `request_id`.

Schema evolution (msgspec rules): new fields go at the end with a default;
fields are never reordered, renamed or retyped; `array_like` structs only
ever append. `tests/control/test_messages.py` decodes stored older bytes.
"""

from __future__ import annotations

from typing import Annotated, Generic, Literal, TypeVar

import msgspec

from lmc_connector.tokens import MAX_TOKEN_ID

TokenId = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKEN_ID)]
#: A chained 64-bit chunk hash (`lmc_connector.tokens.chunk_hashes`).
ChunkKey = Annotated[int, msgspec.Meta(ge=0)]
#: Tensor-parallel ranks and world sizes are small; the caps keep a forged message from
#: making the controller loop over billions of ranks.
MAX_WORLD_SIZE = 256
Rank = Annotated[int, msgspec.Meta(ge=0, le=MAX_WORLD_SIZE - 1)]
WorldSize = Annotated[int, msgspec.Meta(ge=1, le=MAX_WORLD_SIZE)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
#: Where the controller connects back to a worker: an IPv4 address or a DNS name. Anything
#: else (spaces, "*", URLs) is rejected at decoding, so it never reaches a socket.
Host = Annotated[
    str,
    msgspec.Meta(
        max_length=253,
        pattern=r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*$",
    ),
]


class MessageError(ValueError):
    """Bytes from a peer were not a valid message; drop them and keep serving."""


# -- worker -> controller (PUSH / PULL) ------------------------------------------------------


class Register(msgspec.Struct, tag=True):
    """An agent announces itself; the controller (re)creates the worker and forgets its chunks.

    `session` is random per agent start, so a restarted worker is told apart
    from a late message of its previous life.
    """

    instance_id: str
    rank: Rank
    world_size: WorldSize
    session: str
    host: Host
    port: Port
    model: str
    chunk_size: Annotated[int, msgspec.Meta(ge=1)]
    locations: list[str]
    methods: list[str]
    pid: int = 0


class Heartbeat(msgspec.Struct, tag=True, omit_defaults=True):
    """Sent every `controller_heartbeat_interval`; carries where to send a resync request.

    `usage` maps a location to [chunks, used bytes, capacity bytes].
    """

    instance_id: str
    rank: Rank
    session: str
    host: Host
    port: Port
    usage: dict[str, list[int]] = {}


class ChunkOp(msgspec.Struct, array_like=True, gc=False):
    """Keys that entered (`admitted`) or left one location, in engine order."""

    admitted: bool
    location: str
    keys: list[ChunkKey]


class ChunkEvents(msgspec.Struct, tag=True, gc=False):
    """A batch of admit/evict operations of one worker, applied in order (the hot message)."""

    instance_id: str
    rank: Rank
    session: str
    ops: list[ChunkOp]


class Snapshot(msgspec.Struct, tag=True, gc=False):
    """Every key the worker holds per location; replaces what the controller knew."""

    instance_id: str
    rank: Rank
    session: str
    locations: dict[str, list[ChunkKey]]


class JobDone(msgspec.Struct, tag=True, omit_defaults=True):
    """A background compress/decompress finished on one worker; `errors` non-empty = failed."""

    instance_id: str
    rank: Rank
    session: str
    event_id: str
    num_tokens: int = 0
    chunks_done: int = 0
    chunks_skipped: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    errors: list[str] = []


class Deregister(msgspec.Struct, tag=True):
    """The agent is closing; the controller drops the worker and its chunks at once."""

    instance_id: str
    rank: Rank
    session: str


WorkerMessage = Register | Heartbeat | ChunkEvents | Snapshot | JobDone | Deregister


# -- controller -> worker (DEALER / ROUTER) ---------------------------------------------------


TRANSFORM_KINDS = ("compress", "decompress")


class TransformOp(msgspec.Struct, tag="transform"):
    kind: Literal["compress", "decompress"]
    method: str
    location: str
    tokens: list[TokenId]


class PinOp(msgspec.Struct, tag="pin"):
    """Pin the cached prefix in `location` (any location when None)."""

    tokens: list[TokenId]
    location: str | None = None


class UnpinOp(msgspec.Struct, tag="unpin"):
    tokens: list[TokenId]


class ClearOp(msgspec.Struct, tag="clear"):
    """Clear one location, or every location when `location` is None."""

    location: str | None = None


class MoveOp(msgspec.Struct, tag="move"):
    source: str
    destination: str
    tokens: list[TokenId]


Op = TransformOp | PinOp | UnpinOp | ClearOp | MoveOp


class Prepare(msgspec.Struct, tag=True):
    """Phase one: validate `op` (a transform also pins its chunks) and hold it; change nothing.

    The worker holds it for `ttl_s` seconds from receipt (its own monotonic
    clock, so the two machines' wall clocks never meet); a prepared op neither
    committed nor aborted by then (plus a grace period) is dropped and its pins
    released. `expires_at` (controller wall clock) is still sent for workers
    of earlier releases; a worker given `ttl_s` ignores it.
    """

    request_id: int
    event_id: str
    op: Op
    expires_at: float
    ttl_s: float | None = None


class Commit(msgspec.Struct, tag=True):
    """Phase two: carry out the op prepared under `event_id` (a transform starts in background)."""

    request_id: int
    event_id: str


class Abort(msgspec.Struct, tag=True):
    """Forget the op prepared under `event_id` and release its pins."""

    request_id: int
    event_id: str


class Resync(msgspec.Struct, tag=True):
    """The controller does not know this worker (it restarted): register and send a snapshot."""

    request_id: int


Command = Prepare | Commit | Abort | Resync


# -- worker -> controller replies --------------------------------------------------------------


class Ok(msgspec.Struct, tag=True, omit_defaults=True):
    """Success; `num_tokens` is tokens covered (prepare/commit of token ops), counts for clear."""

    request_id: int
    num_tokens: int = 0
    removed: int = 0
    kept: int = 0


#: "internal": the worker hit an unexpected error (logged there with its traceback).
ErrorCode = Literal[
    "bad_request", "unknown_location", "unknown_method", "unknown_event", "expired", "internal"
]


class Failed(msgspec.Struct, tag=True):
    request_id: int
    code: ErrorCode
    error: str


Reply = Ok | Failed


# -- codecs ------------------------------------------------------------------------------------

_encoder = msgspec.msgpack.Encoder()


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


T = TypeVar("T")


class Decoder(Generic[T]):
    """A reused typed decoder that turns every malformed input into `MessageError`."""

    def __init__(self, kind: type[T], name: str) -> None:
        self._decoder = msgspec.msgpack.Decoder(kind)
        self._name = name

    def decode(self, data: bytes | memoryview) -> T:
        try:
            return self._decoder.decode(data)
        except msgspec.DecodeError as e:
            raise MessageError(f"malformed {self._name} message ({len(data)} bytes): {e}") from e


def worker_message_decoder() -> Decoder[WorkerMessage]:
    return Decoder(WorkerMessage, "worker")  # type: ignore[arg-type]


def command_decoder() -> Decoder[Command]:
    return Decoder(Command, "command")  # type: ignore[arg-type]


def reply_decoder() -> Decoder[Reply]:
    return Decoder(Reply, "reply")  # type: ignore[arg-type]
