"""Chunking and stable prefix hashing of token ids.

Shared by the controller and every worker, so it must give the same hashes in
every process and on every machine: blake2b over little-endian uint32 token
ids, chained through the previous chunk's hash. Never Python's salted `hash()`.

Token ids alone do not decide a prompt's KV: a LoRA adapter, the images behind
multimodal placeholder tokens and a tenant's `cache_salt` change it too. A
`KeyScope` names those; it is mixed into the chain's first key (and so into
every key after it), so prompts that differ in any of them never share a chunk.
An empty scope gives the plain token chain.
"""

from __future__ import annotations

import hashlib
import json
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NewType

#: A chained 64-bit chunk hash: the key of a chunk in every tier, on the wire and in the
#: controller's index (together with the layout it belongs to).
ChunkKey = NewType("ChunkKey", int)

#: The parent of the first chunk; a constant so that hashes are stable across releases.
ROOT_HASH = b"lmc-connector/v1"
MAX_TOKEN_ID = 2**32 - 1


def _token_bytes(tokens: Sequence[int]) -> bytes:
    try:
        packed = array("I", tokens)
    except (OverflowError, TypeError) as e:
        bad = next(
            (t for t in tokens if not isinstance(t, int) or not 0 <= t <= MAX_TOKEN_ID), None
        )
        raise ValueError(f"token ids must be integers in [0, {MAX_TOKEN_ID}]; got {bad!r}") from e
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tobytes()


@dataclass(frozen=True, slots=True)
class KeyScope:
    """What besides the token ids decides a prompt's KV, as vLLM's own prefix cache sees it.

    Built by the scheduler half from vLLM's `Request` (and by the controller
    from an HTTP body that names a salt or an adapter); immutable.
    """

    #: vLLM's per-request `cache_salt` (tenant isolation); None or "" for none.
    cache_salt: str | None = None
    #: The LoRA adapter's name and path (`LoRARequest.lora_name`, `.lora_path`), or None.
    lora_name: str | None = None
    lora_path: str | None = None
    #: Multimodal items: (identifier, placeholder offset, placeholder length) in prompt order.
    multimodal: tuple[tuple[str, int, int], ...] = ()

    def salt(self) -> bytes:
        """The canonical bytes mixed into the first key; empty when the scope is empty."""
        parts: dict[str, object] = {}
        if self.cache_salt:
            parts["salt"] = self.cache_salt
        if self.lora_name is not None or self.lora_path is not None:
            parts["lora"] = [self.lora_name or "", self.lora_path or ""]
        if self.multimodal:
            parts["mm"] = [list(item) for item in self.multimodal]
        if not parts:
            return b""
        return json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()


class Prompt(list[int]):
    """A prompt's token ids with the scope it was served under: a list of ints wherever
    token ids are expected, so token-addressed operations key it under its scope."""

    def __init__(self, tokens: Sequence[int], scope: KeyScope | None = None) -> None:
        super().__init__(tokens)
        self.scope = scope


def scope_of(tokens: Sequence[int]) -> KeyScope | None:
    """The scope of a `Prompt`; None for plain token ids."""
    return tokens.scope if isinstance(tokens, Prompt) else None


def _root(scope: KeyScope | None) -> bytes:
    salt = b"" if scope is None else scope.salt()
    if not salt:
        return ROOT_HASH
    return hashlib.blake2b(salt, digest_size=16, key=ROOT_HASH, person=b"lmc-scope").digest()


def chunk_bounds(num_tokens: int, chunk_size: int) -> list[tuple[int, int]]:
    """(start, end) of each chunk; the last one may be partial."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    return [(s, min(s + chunk_size, num_tokens)) for s in range(0, num_tokens, chunk_size)]


def chunk_hashes(
    tokens: Sequence[int], chunk_size: int, scope: KeyScope | None = None
) -> list[ChunkKey]:
    """One chained 64-bit hash per chunk of `tokens`, including a trailing partial chunk.

    The hash of chunk i depends on every token before its end and on `scope`,
    so equal hashes mean equal prefixes under the same adapter, images and
    salt (up to 64-bit collisions).
    """
    data = _token_bytes(tokens)
    hashes: list[ChunkKey] = []
    parent = _root(scope)
    width = 4 * chunk_size
    for start, _ in chunk_bounds(len(tokens), chunk_size):
        digest = hashlib.blake2b(data[4 * start : 4 * start + width], digest_size=8, key=parent)
        parent = digest.digest()
        hashes.append(ChunkKey(int.from_bytes(parent, "little")))
    return hashes


def prefix_tokens(num_chunks: int, num_tokens: int, chunk_size: int) -> int:
    """How many tokens the first `num_chunks` chunks of a `num_tokens`-long prompt cover."""
    return min(num_chunks * chunk_size, num_tokens)
