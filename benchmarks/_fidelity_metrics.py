"""How far a greedy generation served from compressed KV strays from the exact one.

A `Generation` is what vLLM's `/v1/completions` returns with `logprobs: 20` and
`return_tokens_as_token_ids: true`: the greedy tokens and, at each position,
the top-20 log-probabilities by token id.

* Greedy agreement: the share of the generated tokens equal to the
  reference's token at the same position.
* Before the first difference: the share of the generated tokens before the
  first one that differs (the strict reading: after a divergence the two
  continue from different texts).
* Margin at divergence: how undecided the exact model was where the answers
  part, the gap in nats between its first and second choice there (a small
  gap means the codec tipped a near-tie).
* KL divergence KL(reference || other) at every position whose prefix still
  agrees (the diverging position included), over the reference's top-20
  tokens plus one bucket for the rest of the vocabulary. A reference token
  missing from the other's top 20 gets the other's smallest top-20
  probability (an upper bound on its true probability). Coarsening into the
  bucket can only lower the divergence: the figure is a close lower bound.
* Decision agreement (teacher-forced): at each of the reference's positions,
  whether the model served from compressed KV picks the reference's token
  given the reference's tokens before it. `forced_tokens` assembles these
  decisions from generations restarted after each flip, so one near-tie
  tipped early costs one decision, not the rest of the answer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Generation:
    """Greedy tokens, top log-probabilities per position, and prompt tokens served from cache."""

    tokens: list[int]
    top: list[dict[int, float]]
    cached_tokens: int = 0

    @classmethod
    def from_completion(cls, answer: dict[str, Any]) -> Generation:
        choice = answer["choices"][0]
        logprobs = choice["logprobs"]
        tokens = [_token_id(t) for t in logprobs["tokens"]]
        top = [
            {_token_id(t): float(lp) for t, lp in pos.items()} for pos in logprobs["top_logprobs"]
        ]
        details = answer.get("usage", {}).get("prompt_tokens_details") or {}
        return cls(tokens, top, int(details.get("cached_tokens") or 0))


def _token_id(text: str) -> int:
    """`token_id:123` (vLLM's spelling with `return_tokens_as_token_ids`) -> 123."""
    return int(text.rsplit(":", 1)[1])


def agreed_prefix(reference: list[int], other: list[int]) -> int:
    n = 0
    for a, b in zip(reference, other, strict=False):
        if a != b:
            break
        n += 1
    return n


def kl_top(reference: dict[int, float], other: dict[int, float]) -> float:
    """KL(reference || other) over the reference's top tokens and one bucket for the rest."""
    floor = min(other.values())
    kl = p_mass = q_mass = 0.0
    for token, lp in reference.items():
        lq = other.get(token, floor)
        p = math.exp(lp)
        kl += p * (lp - lq)
        p_mass += p
        q_mass += math.exp(lq)
    rest_p = max(0.0, 1.0 - p_mass)
    rest_q = max(1e-12, 1.0 - q_mass)
    if rest_p > 0:
        kl += rest_p * math.log(rest_p / rest_q)
    return max(0.0, kl)


def top_margin(top: dict[int, float]) -> float:
    """The gap in nats between the first and the second choice."""
    best = sorted(top.values(), reverse=True)
    return best[0] - best[1] if len(best) > 1 else math.inf


def describe_margins(references: Iterable[Generation]) -> str:
    """How decided a model is along its own greedy answers: how many of its decisions had a
    gap under 0.01 and 0.1 nats between its first two choices, and the median gap. A codec
    can only tip a decision whose gap is smaller than the change it makes to the logits."""
    gaps = sorted(top_margin(top) for reference in references for top in reference.top)
    if not gaps:
        return "how decided the model is: no decisions"
    under = [(limit, sum(gap < limit for gap in gaps)) for limit in (0.01, 0.1)]
    return (
        f"how decided the model is, over the reference's {len(gaps)} greedy decisions: gap "
        f"between its first two choices "
        + ", ".join(f"under {limit} nats at {n} ({n / len(gaps):.1%})" for limit, n in under)
        + f"; median {gaps[len(gaps) // 2]:.3f} nats"
    )


def forced_steps(reference: list[int], restarted: Generation, start: int) -> int:
    """How many of the reference's positions from `start` on `restarted` (generated after
    the reference's tokens before `start`) decides: up to and including its first flip."""
    agreed = agreed_prefix(reference[start:], restarted.tokens)
    return min(agreed + 1, len(reference) - start, len(restarted.tokens))


def forced_generation(reference: Generation, pieces: list[tuple[int, Generation]]) -> Generation:
    """The decisions at every reference position, from generations restarted at the given
    positions (each piece's decided steps, see `forced_steps`), as one `Generation`."""
    tokens: list[int] = []
    top: list[dict[int, float]] = []
    for start, piece in pieces:
        if start != len(tokens):
            raise ValueError(f"a piece starts at {start}, after {len(tokens)} decided positions")
        steps = forced_steps(reference.tokens, piece, start)
        tokens.extend(piece.tokens[:steps])
        top.extend(piece.top[:steps])
    return Generation(tokens, top, pieces[0][1].cached_tokens if pieces else 0)


@dataclass(frozen=True)
class Comparison:
    """One prompt against its reference: agreeing tokens, KL at each comparable position."""

    agreed: int
    matches: int
    length: int
    kls: list[float]
    cached_tokens: int
    margin: float | None


def compare(reference: Generation, other: Generation) -> Comparison:
    agreed = agreed_prefix(reference.tokens, other.tokens)
    matches = sum(a == b for a, b in zip(reference.tokens, other.tokens, strict=False))
    length = len(reference.tokens)
    comparable = min(agreed + 1, length, len(other.top))
    kls = [kl_top(reference.top[i], other.top[i]) for i in range(comparable)]
    margin = top_margin(reference.top[agreed]) if agreed < length else None
    return Comparison(agreed, matches, length, kls, other.cached_tokens, margin)


def compare_forced(reference: Generation, forced: Generation) -> Comparison:
    """Like `compare`, for teacher-forced decisions: every position has the reference's prefix,
    so the KL counts at all of them."""
    length = len(reference.tokens)
    if len(forced.tokens) != length:
        raise ValueError(f"{len(forced.tokens)} decisions for {length} reference positions")
    matches = sum(a == b for a, b in zip(reference.tokens, forced.tokens, strict=True))
    kls = [kl_top(r, f) for r, f in zip(reference.top, forced.top, strict=True)]
    agreed = agreed_prefix(reference.tokens, forced.tokens)
    margin = top_margin(reference.top[agreed]) if agreed < length else None
    return Comparison(agreed, matches, length, kls, forced.cached_tokens, margin)


@dataclass
class Summary:
    """The comparisons of one way of serving the KV, over all prompts."""

    comparisons: list[Comparison] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0

    def add(self, comparisons: Iterable[Comparison]) -> None:
        self.comparisons.extend(comparisons)

    @property
    def agreement(self) -> float:
        total = sum(c.length for c in self.comparisons)
        return sum(c.matches for c in self.comparisons) / total if total else float("nan")

    @property
    def before_first_difference(self) -> float:
        total = sum(c.length for c in self.comparisons)
        return sum(c.agreed for c in self.comparisons) / total if total else float("nan")

    @property
    def mean_margin(self) -> float:
        margins = [c.margin for c in self.comparisons if c.margin is not None]
        return sum(margins) / len(margins) if margins else float("nan")

    @property
    def identical(self) -> int:
        return sum(c.agreed == c.length for c in self.comparisons)

    @property
    def kl_positions(self) -> int:
        return sum(len(c.kls) for c in self.comparisons)

    @property
    def mean_kl(self) -> float:
        kls = [kl for c in self.comparisons for kl in c.kls]
        return sum(kls) / len(kls) if kls else float("nan")

    @property
    def cache_hits(self) -> int:
        return sum(c.cached_tokens > 0 for c in self.comparisons)

    @property
    def ratio(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else float("nan")
