"""Which instance can serve another one's prefix, and from where (pure queries, no I/O).

Two instances exchange chunks only when their workers registered the same layout
fingerprint (model, world size, dtype, shape, chunk size), every rank of the serving
instance is registered, and each one serves peers (`enable_p2p`). Rank r always talks to
rank r: the answer lists one peer address per rank, in rank order.
"""

from __future__ import annotations

from collections.abc import Sequence

from lmc_connector import tokens as tok
from lmc_connector.control.controller.errors import ControlError
from lmc_connector.control.controller.instances import Instance
from lmc_connector.control.controller.state import ControllerState
from lmc_connector.control.wire.locate import PeerFound
from lmc_connector.control.wire.types import PromptScope, key_scope
from lmc_connector.tokens import ChunkKey


def fingerprint(instance: Instance) -> str | None:
    """The layout fingerprint all workers of `instance` agree on (None: unknown or mixed)."""
    prints = {w.spec.layout for w in instance.workers.values()}
    return prints.pop() if len(prints) == 1 else None


def peer_addresses(instance: Instance) -> list[str] | None:
    """Each rank's peer server in rank order; None unless every rank is there and serves."""
    if instance.missing_ranks():
        return None
    addresses = [instance.workers[r].spec.peer_address for r in range(instance.world_size)]
    return [a for a in addresses if a is not None] if all(addresses) else None


def find_peer(
    state: ControllerState,
    instance_id: str,
    keys: Sequence[ChunkKey],
    min_chunks: int,
    avoid: Sequence[str] = (),
) -> PeerFound:
    """The instance other than `instance_id` (and those in `avoid`), of its layout, that
    holds the longest prefix of `keys` on every rank, if longer than `min_chunks` (an empty
    answer otherwise)."""
    best = PeerFound()
    with state.lock:
        asker = state.instances.get(instance_id)
        layout = None if asker is None else fingerprint(asker)
        if layout is None:
            return best
        for other in state.instances.values():
            if other.instance_id == instance_id or other.instance_id in avoid:
                continue
            if fingerprint(other) != layout:
                continue
            addresses = peer_addresses(other)
            if addresses is None:
                continue
            held = state.index.prefix(other.instance_id, keys, range(other.world_size))
            if held is not None and held[1] > max(min_chunks, best.chunks):
                best = PeerFound(other.instance_id, held[1], addresses)
    return best


def pull_sources(
    state: ControllerState,
    source_id: str,
    location: str,
    destination_id: str,
    tokens: Sequence[int],
    scope: PromptScope | None = None,
) -> tuple[list[str], int]:
    """For `/move` across instances: the source's peer servers by rank, and the tokens of
    `tokens` (keyed under `scope`) it holds in `location` on every rank. Raises ControlError
    naming the fix."""
    with state.lock:
        source = state.instance(source_id)
        destination = state.instance(destination_id)
        source.ready_workers()
        source.check_location(location)
        theirs, ours = fingerprint(source), fingerprint(destination)
        if theirs is None or theirs != ours:
            raise ControlError(
                f"instances '{source_id}' and '{destination_id}' hold different KV layouts "
                f"(model {source.model} vs {destination.model}, world size {source.world_size}"
                f" vs {destination.world_size}, chunk size {source.chunk_size} vs "
                f"{destination.chunk_size}, or dtype): KV moves only between equal layouts"
            )
        addresses = peer_addresses(source)
        if addresses is None:
            raise ControlError(
                f"instance '{source_id}' serves no peers: start it with enable_p2p: true "
                "(and p2p_init_ports)"
            )
        keys = tok.chunk_hashes(tokens, source.chunk_size, key_scope(scope))
        held = state.index.prefix(source_id, keys, range(source.world_size), location)
        chunks = 0 if held is None else held[1]
        return addresses, tok.prefix_tokens(chunks, len(tokens), source.chunk_size)
