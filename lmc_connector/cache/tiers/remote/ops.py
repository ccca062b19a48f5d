"""The store commands the tier uses, one round trip each (a pipeline or a script), on Redis
and Redis Cluster alike: every command or script names keys of one chunk, one hash slot.

Functions raise the client's errors (`client.STORE_ERRORS`); the tier turns them into misses.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from lmc_connector.cache.tiers.remote.client import Client
from lmc_connector.cache.tiers.remote.keys import StoreKeys
from lmc_connector.cache.tiers.remote.values import StoreValue
from lmc_connector.tokens import ChunkKey

#: Pieces asked for per round trip on the load path. Few: Redis serves 1 MiB values fastest
#: one or two at a time (a deep pipeline of large replies piles them up in fresh memory on
#: both sides, measured 2-3x slower here), while uploads go fastest fully pipelined.
PIECES_IN_FLIGHT = 2
#: Names unlinked per round trip when a layout is cleared, and names between progress lines.
CLEAR_BATCH = 512
CLEAR_LOG_EVERY = 100_000

logger = logging.getLogger(__name__)

# KEYS: head, staged head, n staged pieces, n pieces, then old pieces beyond n to drop.
# ARGV: the head the caller read, n. Staged names are dropped when the head changed.
_SWAP_IF_SAME = """
local n = tonumber(ARGV[2])
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
    for i = 2, 2 + n do redis.call('UNLINK', KEYS[i]) end
    return 0
end
for i = 1, n do redis.call('RENAME', KEYS[2 + i], KEYS[2 + n + i]) end
for i = 3 + 2 * n, #KEYS do redis.call('UNLINK', KEYS[i]) end
redis.call('RENAME', KEYS[2], KEYS[1])
return 1
"""
# KEYS: head, n staged pieces, n pieces. ARGV: the head's value, n. The staged pieces are
# renamed into place and the head set only while no head exists (another writer was not
# first) and every staged piece is still there (none evicted meanwhile); else they go.
_WRITE_IF_ABSENT = """
local n = tonumber(ARGV[2])
local whole = redis.call('EXISTS', KEYS[1]) == 0
for i = 2, 1 + n do
    if whole and redis.call('EXISTS', KEYS[i]) == 0 then whole = false end
end
if not whole then
    for i = 2, 1 + n do redis.call('UNLINK', KEYS[i]) end
    return 0
end
for i = 1, n do redis.call('RENAME', KEYS[1 + i], KEYS[1 + n + i]) end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""
# KEYS: head, then every piece name. ARGV: the head the caller read.
_UNLINK_IF_SAME = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
for i = 1, #KEYS do redis.call('UNLINK', KEYS[i]) end
return 1
"""


@dataclass(frozen=True, slots=True)
class ChunkNames:
    """A chunk's head and the piece names a reader asks for (as many as the layout allows)."""

    head: str
    pieces: list[str]


def exists(client: Client, heads: Sequence[str]) -> list[bool]:
    pipe = client.pipeline(transaction=False)
    for head in heads:
        pipe.exists(head)
    return [bool(n) for n in pipe.execute()]


def read_heads(client: Client, heads: Sequence[str]) -> list[Any]:
    """Each head (None when absent; a name of the wrong type comes back as its error)."""
    pipe = client.pipeline(transaction=False)
    for head in heads:
        pipe.get(head)
    return _replies(pipe.execute(raise_on_error=False))


def read_pieces(client: Client, names: Sequence[str], take: Callable[[list[Any]], None]) -> int:
    """Fetch the pieces `names`, PIECES_IN_FLIGHT per round trip, handing each group to
    `take` in order (None for a missing piece) before asking for the next; returns how
    many were fetched."""
    for start in range(0, len(names), PIECES_IN_FLIGHT):
        pipe = client.pipeline(transaction=False)
        for name in names[start : start + PIECES_IN_FLIGHT]:
            pipe.get(name)
        take(_replies(pipe.execute(raise_on_error=False)))
    return len(names)


def _replies(replies: list[Any]) -> list[Any]:
    for reply in replies:
        if isinstance(reply, RedisConnectionError | RedisTimeoutError):
            raise reply
    return replies


def write_values(
    client: Client, writes: Sequence[tuple[ChunkNames, ChunkNames, StoreValue]]
) -> list[bool]:
    """Write each value unless its chunk has a head already (another writer was first), in
    one round trip: its pieces under staged names, then a script that renames them into
    place and sets the head, or drops them. (names, staged names, value) per chunk; True
    where this value landed. A reader never sees one writer's head over another's pieces."""
    pipe = client.pipeline(transaction=False)
    for _, staged, value in writes:
        for name, piece in zip(staged.pieces, value.pieces, strict=False):
            pipe.set(name, piece)
    for names, staged, value in writes:
        count = len(value.pieces)
        keys = [names.head, *staged.pieces[:count], *names.pieces[:count]]
        # execute_command: a Redis Cluster pipeline has no eval(), but routes EVAL by its keys.
        pipe.execute_command("EVAL", _WRITE_IF_ABSENT, len(keys), *keys, value.header, count)
    replies = pipe.execute()
    return [reply == 1 for reply in replies[-len(writes) :]] if writes else []


def swap_value(
    client: Client, names: ChunkNames, staged: ChunkNames, marker: bytes, value: StoreValue
) -> bool:
    """Replace a chunk's value if its head is still `marker`, atomically (staged first)."""
    count = len(value.pieces)
    pipe = client.pipeline(transaction=False)
    for name, piece in zip(staged.pieces, value.pieces, strict=False):
        pipe.set(name, piece)
    pipe.set(staged.head, value.header)
    pipe.execute()
    keys = [names.head, staged.head, *staged.pieces[:count], *names.pieces]
    return bool(client.eval(_SWAP_IF_SAME, len(keys), *keys, marker, count))


def unlink(client: Client, chunks: Sequence[ChunkNames]) -> list[bool]:
    """Unlink each chunk's head and pieces; whether each head was there."""
    pipe = client.pipeline(transaction=False)
    for names in chunks:
        pipe.unlink(names.head)
        pipe.unlink(*names.pieces)
    replies = pipe.execute()
    return [bool(n) for n in replies[0::2]]


def unlink_names(client: Client, names: Sequence[str]) -> int:
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.unlink(name)
    return sum(int(n) for n in pipe.execute())


def unlink_layout(
    client: Client,
    keys: StoreKeys,
    keep: Callable[[ChunkKey], bool],
    gone: Callable[[list[ChunkKey]], None],
) -> tuple[int, int]:
    """Unlink every name of `keys`' layout (SCAN, then UNLINK in batches) but the names of
    chunks `keep` says to keep, handing each batch's chunks whose head went to `gone`:
    (chunks whose head went, chunks kept)."""
    heads: list[ChunkKey] = []
    kept: set[ChunkKey] = set()
    batch: list[str] = []
    seen, removed, started = 0, 0, time.monotonic()
    for name in client.scan_iter(match=keys.pattern, count=1000):
        parsed = keys.parse(name)
        if parsed is None:
            continue
        key, kind = parsed
        if keep(key):
            kept.add(key)
            continue
        batch.append(name.decode() if isinstance(name, bytes) else name)
        if kind == "head":
            heads.append(key)
        if len(batch) >= CLEAR_BATCH:
            unlink_names(client, batch)
            gone(heads)
            seen, removed, batch, heads = seen + len(batch), removed + len(heads), [], []
            if seen % CLEAR_LOG_EVERY < CLEAR_BATCH:
                rate = seen / max(time.monotonic() - started, 1e-9)
                logger.info("clearing %s*: %d names unlinked (%.0f/s)", keys.namespace, seen, rate)
    if batch:
        unlink_names(client, batch)
        gone(heads)
        removed += len(heads)
    return removed, len(kept)


def unlink_if(client: Client, names: ChunkNames, marker: bytes) -> bool:
    """Unlink a chunk if its head is still `marker` (nobody replaced it meanwhile)."""
    keys = [names.head, *names.pieces]
    return bool(client.eval(_UNLINK_IF_SAME, len(keys), *keys, marker))
