"""Names of chunk values in the shared store.

    lmc:<layout fingerprint>:{<chunk hash>}              a chunk's head (`values.py`)
    lmc:<layout fingerprint>:{<chunk hash>}:<i>          its pieces
    lmc:<layout fingerprint>:{<chunk hash>}:s<id>[:<i>]  a replacement being staged

The fingerprint (model, world size, rank, dtype, chunk size, planes, layers,
channels) separates what may be shared from what must never meet. The braces
make every name of one chunk one Redis Cluster hash slot, so a chunk's
commands go to one node (and a replacement can be renamed into place there),
while chunks spread over the cluster by their hash.
"""

from __future__ import annotations

import uuid
from typing import Literal

from lmc_connector.tokens import ChunkKey

PREFIX = "lmc"
NameKind = Literal["head", "piece", "staged"]


class StoreKeys:
    """The names of one layout (immutable)."""

    def __init__(self, fingerprint: str) -> None:
        self.namespace = f"{PREFIX}:{fingerprint}:"
        #: SCAN pattern of every name of this layout.
        self.pattern = self.namespace + "*"

    def head(self, chunk: ChunkKey) -> str:
        return f"{self.namespace}{{{chunk:016x}}}"

    def pieces(self, chunk: ChunkKey, count: int, base: str | None = None) -> list[str]:
        """The names of the first `count` pieces under `base` (default: the chunk's head)."""
        return piece_names(base or self.head(chunk), count)

    def staging(self, chunk: ChunkKey) -> str:
        """A fresh head name to stage a replacement of `chunk` under (pieces: `pieces(...)`)."""
        return f"{self.head(chunk)}:s{uuid.uuid4().hex[:12]}"

    def parse(self, name: bytes | str) -> tuple[ChunkKey, NameKind] | None:
        """(chunk, kind of name) for a name of this layout; None for anything else."""
        text = name.decode(errors="replace") if isinstance(name, bytes) else name
        if not text.startswith(self.namespace + "{"):
            return None
        hash_text, brace, rest = text[len(self.namespace) + 1 :].partition("}")
        if not brace or len(hash_text) != 16:
            return None
        try:
            chunk = ChunkKey(int(hash_text, 16))
        except ValueError:
            return None
        if not rest:
            return chunk, "head"
        return chunk, ("staged" if rest.startswith(":s") else "piece")


def piece_names(head: str, count: int) -> list[str]:
    """The names of the first `count` pieces of the value whose head is `head` (chunks'
    and calibrations' alike)."""
    return [f"{head}:{i}" for i in range(count)]
