"""Commands the controller sends to a worker's command port, and the worker's replies.

Requests and replies travel over the request/reply transport (`rpc.py`),
which matches them; the messages carry no request ids. Every command runs in
two phases: `Prepare` validates and holds an op (a transform also pins its
chunks), `Commit` carries it out, `Abort` forgets it. `Resync`, `Registered`
and `RegistrationRefused` are notifications (no reply). Schema evolution as
in `monitor.py`.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from lmc_connector.control.wire.codec import Decoder
from lmc_connector.control.wire.types import (
    MAX_WORLD_SIZE,
    Name,
    PeerAddress,
    PromptScope,
    TokenList,
)
from lmc_connector.operations import JobOutcome, TransformKind

#: Longest time a worker holds a prepared op for the controller (its `--command-timeout` is
#: seconds); a larger `ttl_s` is refused at decoding, so a forged Prepare cannot pin forever.
MAX_PREPARE_TTL_S = 300.0


class TransformOp(msgspec.Struct, tag="transform"):
    """Code the cached prefix of `tokens` in `location`, or with `every_chunk` every chunk
    there (`tokens` is then empty)."""

    kind: TransformKind
    method: Name
    location: Name
    tokens: TokenList
    every_chunk: bool = False
    #: The prompt's salt and adapter (hashed into its chunk keys); None for plain tokens.
    scope: PromptScope | None = None


class PinOp(msgspec.Struct, tag="pin"):
    """Pin the cached prefix in `location` (any location when None)."""

    tokens: TokenList
    location: Name | None = None
    scope: PromptScope | None = None


class UnpinOp(msgspec.Struct, tag="unpin"):
    tokens: TokenList
    scope: PromptScope | None = None


class ClearOp(msgspec.Struct, tag="clear"):
    """Clear one location, or every location when `location` is None."""

    location: Name | None = None


class MoveOp(msgspec.Struct, tag="move"):
    source: Name
    destination: Name
    tokens: TokenList
    scope: PromptScope | None = None


class PullOp(msgspec.Struct, tag="pull"):
    """Fetch the cached prefix of `tokens` from `source_location` of another instance into
    `location`, rank for rank: rank r pulls from `sources[r]`, the peer server of the source's
    rank r. With `remove_source`, the source drops each chunk once this worker holds it.
    Runs in the background like a transform; `num_tokens` is what the controller's index
    says the source holds (the prepare phase answers with it)."""

    sources: Annotated[list[PeerAddress], msgspec.Meta(max_length=MAX_WORLD_SIZE)]
    source_location: Name
    location: Name
    tokens: TokenList
    remove_source: bool = False
    num_tokens: int = 0
    scope: PromptScope | None = None


class CalibrateOp(msgspec.Struct, tag="calibrate"):
    """Fit a calibration of `method` (a calibrated codec) on chunks this worker has cached, in
    the background like a transform, and encode with it from then on. `num_tokens` of the
    prepare answer: the tokens chosen as samples."""

    method: Name


Op = TransformOp | PinOp | UnpinOp | ClearOp | MoveOp | PullOp | CalibrateOp


class Prepare(msgspec.Struct, tag=True):
    """Phase one: validate `op` (a transform also pins its chunks) and hold it; change nothing.

    The worker holds it for `ttl_s` seconds from receipt, on its own
    monotonic clock; an op neither committed nor aborted by then (plus a
    grace period) is dropped and its pins released.
    """

    event_id: str
    op: Op
    ttl_s: Annotated[float, msgspec.Meta(gt=0, le=MAX_PREPARE_TTL_S)]


class Commit(msgspec.Struct, tag=True):
    """Phase two: carry out the op prepared under `event_id` (a transform starts in background)."""

    event_id: str


class Abort(msgspec.Struct, tag=True):
    """Forget the op prepared under `event_id` and release its pins."""

    event_id: str


class Resync(msgspec.Struct, tag=True):
    """The controller does not know this worker (it restarted): register and send a snapshot."""


class Registered(msgspec.Struct, tag=True):
    """The controller took the registration of this worker's `session`: stop re-sending it."""

    session: str


class RegistrationRefused(msgspec.Struct, tag=True):
    """The controller refused the registration of `session`; `reason` says how to fix it."""

    session: str
    reason: Annotated[str, msgspec.Meta(max_length=1000)]


Command = Prepare | Commit | Abort | Resync | Registered | RegistrationRefused


class Ok(msgspec.Struct, tag=True, omit_defaults=True):
    """Success; `outcome` counts what the phase covered (tokens, or removed/kept for clear)."""

    outcome: JobOutcome = msgspec.field(default_factory=JobOutcome)


#: "internal": the worker hit an unexpected error (logged there with its traceback).
#: "conflict": the worker cannot do it yet (a compress needing a calibration it has not got,
#: a calibration before enough KV is cached); the error says what to do first.
ErrorCode = Literal[
    "bad_request",
    "unknown_location",
    "unknown_method",
    "unknown_event",
    "expired",
    "busy",
    "internal",
    "conflict",
]


class Failed(msgspec.Struct, tag=True):
    code: ErrorCode
    error: str


Reply = Ok | Failed


def command_decoder() -> Decoder[Command]:
    return Decoder(Command, "command")


def reply_decoder() -> Decoder[Reply]:
    return Decoder(Reply, "reply")
