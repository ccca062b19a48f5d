"""A cached chunk: a plain tensor or an encoded blob, never both, never half."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Chunk:
    """One immutable cache entry; compression swaps the whole object.

    Exactly one of `kv` (a CPU tensor `[planes, layers, tokens, channels]`,
    never modified after insertion) and `blob` (bytes of the codec format,
    produced by `method`; a read-only view where it was read back from a
    store, into pooled memory, or received from a peer, in its frame) is set.
    `borrowed`: `kv` views memory torch does not own (a received message, a
    file's bytes), which the buffer pool must never hand out again.
    """

    num_tokens: int
    kv: torch.Tensor | None = None
    blob: bytes | memoryview | None = None
    method: str | None = None
    borrowed: bool = False

    def __post_init__(self) -> None:
        assert (self.kv is None) != (self.blob is None)
        assert (self.blob is None) == (self.method is None)

    @property
    def encoded(self) -> bool:
        return self.blob is not None

    @property
    def form(self) -> ChunkForm:
        return ChunkForm(self.num_tokens, self.method)

    @property
    def nbytes(self) -> int:
        if self.kv is not None:
            return self.kv.numel() * self.kv.element_size()
        assert self.blob is not None
        return len(self.blob)


@dataclass(frozen=True, slots=True)
class ChunkForm:
    """What a tier holds under a key, without the data: its tokens, and the codec that
    encoded it (None for a plain tensor)."""

    num_tokens: int
    method: str | None
