"""Emptying tiers: an operator's clear (pinned chunks stay) and vLLM's reset (nothing stays)."""

from __future__ import annotations

from typing import NamedTuple

from lmc_connector.cache.tiers import Tier, TierContext
from lmc_connector.tokens import ChunkKey


class Cleared(NamedTuple):
    """What a clear did: chunk entries removed and kept (pinned), and the tokens they held."""

    removed: int
    kept: int
    num_tokens: int


def clear(tiers: list[Tier]) -> Cleared:
    """Remove every unpinned chunk of `tiers`.

    Counts are summed over the tiers; `num_tokens` counts each chunk that was
    there when the clear began and is gone from every cleared tier at its end.
    """
    removed = kept = 0
    tokens: dict[ChunkKey, int] = {}
    remaining: set[ChunkKey] = set()
    for tier in tiers:
        keys = tier.chunk_keys()
        before = tier.forms(keys)
        gone, pinned = tier.clear()
        removed, kept = removed + gone, kept + pinned
        for key, form, held in zip(keys, before, tier.held(keys), strict=True):
            if form is not None:
                tokens[key] = form.num_tokens
            if held:
                remaining.add(key)
    num_tokens = sum(n for key, n in tokens.items() if key not in remaining)
    return Cleared(removed, kept, num_tokens)


def reset(ctx: TierContext, tiers: list[Tier], shared: bool) -> int:
    """Remove every chunk of the tiers this instance owns (and of shared ones with
    `shared`), pinned ones included; returns the chunk entries removed.

    Cached KV may be stale (new weights), so nothing is kept. Pins stay with
    their holders, who release them as usual; a load planned on a removed
    chunk finds it missing and vLLM recomputes those tokens. Spills in flight
    are withdrawn. A chunk stored while the reset runs may survive it.
    Calibrations stay: one fitted before new weights still decodes what it
    encoded (calibrate again for the new weights' best ratio and fidelity).
    """
    ctx.cancel_spills()
    removed = 0
    for tier in tiers:
        if tier.shared and not shared:
            continue
        if tier.answers_from_memory:
            removed += tier.remove(tier.chunk_keys())
        else:
            removed += tier.clear()[0]
    return removed
