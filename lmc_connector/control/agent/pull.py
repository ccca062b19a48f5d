"""The destination's side of `/move` across instances: pull a prefix from the same rank of
the source instance, store it, and (without copy) have the source drop what arrived."""

from __future__ import annotations

import logging
import time

from lmc_connector import tokens as tok
from lmc_connector.cache import CacheEngine
from lmc_connector.control.agent.peer_client import PeerClient, PeerUnavailableError
from lmc_connector.control.wire import commands as cmd
from lmc_connector.control.wire.types import prompt_of
from lmc_connector.operations import JobOutcome
from lmc_connector.tokens import ChunkKey

logger = logging.getLogger(__name__)


def pull(engine: CacheEngine, client: PeerClient, op: cmd.PullOp, rank: int) -> JobOutcome:
    """Carry out this rank's part of `op` (on the agent's jobs thread); never raises for a
    peer that fails: the outcome's `errors` say what went wrong and how far it got."""
    started = time.perf_counter()
    outcome = JobOutcome()
    address = op.sources[rank]
    keys = engine.hashes(prompt_of(op.tokens, op.scope))
    held: list[ChunkKey] = []
    try:
        for key, chunk in client.fetch(address, keys, op.source_location):
            if not engine.admit(key, chunk, op.location):
                outcome.errors.append(f"no room in {op.location} after {len(held)} chunks")
                break
            held.append(key)
            outcome.bytes_before += chunk.nbytes
            outcome.bytes_after += chunk.nbytes
    except PeerUnavailableError as e:
        outcome.errors.append(f"pull from {address} stopped after {len(held)} chunks: {e}")
    outcome.chunks_done = len(held)
    outcome.num_tokens = tok.prefix_tokens(len(held), len(op.tokens), engine.layout.chunk_size)
    if op.remove_source and held:
        try:
            outcome.removed = client.drop(address, held, op.source_location)
        except PeerUnavailableError as e:
            outcome.errors.append(f"copied, but the source did not drop its chunks: {e}")
    outcome.seconds = time.perf_counter() - started
    rate = outcome.bytes_after / outcome.seconds / 1e9 if outcome.seconds > 0 else 0.0
    logger.info(
        "pulled %d chunks (%d tokens, %.1f MB, %.2f GB/s) from %s %s into %s%s%s",
        len(held),
        outcome.num_tokens,
        outcome.bytes_after / 1e6,
        rate,
        address,
        op.source_location,
        op.location,
        f", source dropped {outcome.removed}" if op.remove_source else "",
        f"; errors: {outcome.errors}" if outcome.errors else "",
    )
    return outcome
