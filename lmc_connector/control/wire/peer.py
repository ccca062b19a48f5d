"""Messages of the peer channel: one worker asks a worker of another instance, rank to rank,
for the chunks it holds (`p2p_host`, `p2p_init_ports[rank]`).

A `Fetch` is answered by one `Chunks` header frame followed by one frame per chunk found,
in order: the raw bytes of a plain chunk (its shape follows from the shared layout and
`num_tokens`), or the codec blob of an encoded one, as stored. Chunk bytes never pass through
msgpack, so the server sends them without a copy. Travels over the request/reply transport.
Schema evolution as in `monitor.py`.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from lmc_connector.control.wire.codec import Decoder
from lmc_connector.control.wire.types import Name, WireChunkKey

#: Chunks asked for in one `Fetch` at most: a reply stays a bounded number of frames.
MAX_FETCH_KEYS = 256
#: A layout fingerprint (`ChunkLayout.instance_fingerprint`).
Fingerprint = Annotated[str, msgspec.Meta(max_length=64)]
Keys = Annotated[list[WireChunkKey], msgspec.Meta(max_length=MAX_FETCH_KEYS)]


class Fetch(msgspec.Struct, tag=True, array_like=True, gc=False):
    """Send the chunks stored under `keys`, stopping at the first one missing.

    `layout` is the asker's fingerprint: a server of another layout answers with an error,
    never with chunks. `location` limits the search to one tier (None: any local tier).
    """

    layout: Fingerprint
    keys: Keys
    location: Name | None = None


class Drop(msgspec.Struct, tag=True, array_like=True, gc=False):
    """Remove these chunks from `location`: the asker holds them now (the end of a `/move`
    without copy). Answered by a `Chunks` header whose `dropped` counts them."""

    layout: Fingerprint
    keys: Keys
    location: Name


PeerRequest = Fetch | Drop


class ChunkInfo(msgspec.Struct, array_like=True, gc=False):
    """One chunk of a reply: its tokens, and the codec of its blob (None: plain tensor bytes)."""

    num_tokens: Annotated[int, msgspec.Meta(ge=1)]
    method: Name | None = None


class Chunks(msgspec.Struct, array_like=True, gc=False):
    """The header of a reply: one `ChunkInfo` per chunk frame that follows."""

    chunks: Annotated[list[ChunkInfo], msgspec.Meta(max_length=MAX_FETCH_KEYS)] = []
    dropped: int = 0
    error: str | None = None


def peer_request_decoder() -> Decoder[PeerRequest]:
    return Decoder(PeerRequest, "peer request")


def chunks_decoder() -> Decoder[Chunks]:
    return Decoder(Chunks, "peer reply")
