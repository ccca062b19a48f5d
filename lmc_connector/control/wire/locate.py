"""Messages of the locate channel: a vLLM scheduler asks the controller which other instance
holds the longest prefix of a prompt, and where each rank of it serves peers.

Travels over the request/reply transport to the controller's `--reply-port`
(`controller_reply_url` on the worker side). One round trip per lookup that the local cache
could not answer in full. Schema evolution as in `monitor.py`.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from lmc_connector.control.wire.codec import Decoder
from lmc_connector.control.wire.types import (
    MAX_WORLD_SIZE,
    InstanceId,
    PeerAddress,
    WireChunkKey,
)

#: Chunk keys of one prompt at most (a 1M-token prompt of 64-token chunks).
MAX_LOCATE_KEYS = 16384


class FindPeer(msgspec.Struct, tag=True, array_like=True, gc=False):
    """Which instance other than `instance_id`, with the same layout fingerprint, holds the
    longest prefix of `keys` on every rank?

    `min_chunks`: answer only with a peer holding more chunks than this (what the asker has);
    `avoid`: instances whose peer servers recently failed the asker.
    """

    instance_id: InstanceId
    keys: Annotated[list[WireChunkKey], msgspec.Meta(max_length=MAX_LOCATE_KEYS)]
    min_chunks: Annotated[int, msgspec.Meta(ge=0)] = 0
    avoid: Annotated[list[InstanceId], msgspec.Meta(max_length=64)] = []


class PeerFound(msgspec.Struct, array_like=True, gc=False):
    """The answer: `chunks` of the prefix held by `instance_id` (0 and no addresses: none),
    and its peer server per rank, indexed by rank."""

    instance_id: str = ""
    chunks: int = 0
    addresses: Annotated[list[PeerAddress], msgspec.Meta(max_length=MAX_WORLD_SIZE)] = []
    error: str | None = None


def find_peer_decoder() -> Decoder[FindPeer]:
    return Decoder(FindPeer, "find-peer")


def peer_found_decoder() -> Decoder[PeerFound]:
    return Decoder(PeerFound, "peer-found")
