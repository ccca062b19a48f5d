"""Messages of the scheduler's lookup channel to the caches in its own workers.

The scheduler asks every rank how much of a prompt is cached (and pins it
until the load); ranks answer with tokens and where those tokens are. It also
relays vLLM's cache reset. Travels over the request/reply transport on a
node-local path.
"""

from __future__ import annotations

import msgspec

from lmc_connector.control.wire.codec import Decoder
from lmc_connector.control.wire.types import WireChunkKey


class Lookup(msgspec.Struct, tag=True, array_like=True, gc=False):
    """How many prefix tokens of a prompt with these chunk keys are cached (pin them)."""

    req_id: str
    keys: list[WireChunkKey]
    num_tokens: int
    pin: bool = True


class Unpin(msgspec.Struct, tag=True, array_like=True, gc=False):
    """Drop the pins taken by lookups of `req_id` (a notification: no reply)."""

    req_id: str


class Reset(msgspec.Struct, tag=True, array_like=True, gc=False):
    """Empty this rank's cache (vLLM's `reset_cache`); `shared`: shared tiers too."""

    shared: bool = False


LookupRequest = Lookup | Unpin | Reset


class LookupReply(msgspec.Struct, array_like=True, gc=False):
    tokens: int
    error: str | None = None
    #: Where the hit chunks are, in prefix order: runs of (vLLM cache-hit source of the
    #: nearest tier holding them, e.g. "host" or "disk"; number of chunks).
    sources: list[tuple[str, int]] = []


class ResetReply(msgspec.Struct, array_like=True, gc=False):
    """Chunk entries the rank removed, or why it could not reset."""

    removed: int
    error: str | None = None


def lookup_request_decoder() -> Decoder[LookupRequest]:
    return Decoder(LookupRequest, "lookup")


def lookup_reply_decoder() -> Decoder[LookupReply]:
    return Decoder(LookupReply, "lookup reply")


def reset_reply_decoder() -> Decoder[ResetReply]:
    return Decoder(ResetReply, "reset reply")
