"""Chunking and stable prefix hashing of token ids.

Shared by the controller and every worker, so it must give the same hashes in
every process and on every machine: blake2b over little-endian uint32 token
ids, chained through the previous chunk's hash. Never Python's salted `hash()`.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Sequence
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


def chunk_bounds(num_tokens: int, chunk_size: int) -> list[tuple[int, int]]:
    """(start, end) of each chunk; the last one may be partial."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    return [(s, min(s + chunk_size, num_tokens)) for s in range(0, num_tokens, chunk_size)]


def chunk_hashes(tokens: Sequence[int], chunk_size: int) -> list[ChunkKey]:
    """One chained 64-bit hash per chunk of `tokens`, including a trailing partial chunk.

    The hash of chunk i depends on every token before its end, so equal hashes
    mean equal prefixes (up to 64-bit collisions).
    """
    data = _token_bytes(tokens)
    hashes: list[ChunkKey] = []
    parent = ROOT_HASH
    width = 4 * chunk_size
    for start, _ in chunk_bounds(len(tokens), chunk_size):
        digest = hashlib.blake2b(data[4 * start : 4 * start + width], digest_size=8, key=parent)
        parent = digest.digest()
        hashes.append(ChunkKey(int.from_bytes(parent, "little")))
    return hashes


def prefix_tokens(num_chunks: int, num_tokens: int, chunk_size: int) -> int:
    """How many tokens the first `num_chunks` chunks of a `num_tokens`-long prompt cover."""
    return min(num_chunks * chunk_size, num_tokens)
