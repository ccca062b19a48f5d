"""Messages of the scheduler's lookup channel to the caches in its own workers.

The scheduler asks every rank how much of a prompt is cached (and pins it
until the load); ranks answer with tokens. Travels over the request/reply
transport on a node-local path.
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


LookupRequest = Lookup | Unpin


class LookupReply(msgspec.Struct, array_like=True, gc=False):
    tokens: int
    error: str | None = None


def lookup_request_decoder() -> Decoder[LookupRequest]:
    return Decoder(LookupRequest, "lookup")


def lookup_reply_decoder() -> Decoder[LookupReply]:
    return Decoder(LookupReply, "lookup reply")
