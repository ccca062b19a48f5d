"""The fidelity benchmark's metrics on hand-made generations (no vLLM)."""

import math

import pytest

from benchmarks._fidelity_metrics import (
    Generation,
    Summary,
    compare,
    compare_forced,
    describe_margins,
    forced_generation,
    forced_steps,
    kl_top,
)

CONFIDENT = {1: math.log(0.9), 2: math.log(0.06), 3: math.log(0.03)}
UNSURE = {1: math.log(0.5), 2: math.log(0.3), 3: math.log(0.1)}


def generation(tokens: list[int], top: dict[int, float] = CONFIDENT) -> Generation:
    return Generation(tokens, [dict(top) for _ in tokens], cached_tokens=7)


def test_parses_a_completion_with_token_ids() -> None:
    answer = {
        "choices": [
            {
                "logprobs": {
                    "tokens": ["token_id:5", "token_id:9"],
                    "top_logprobs": [
                        {"token_id:5": -0.1, "token_id:6": -2.5},
                        {"token_id:9": -0.2},
                    ],
                }
            }
        ],
        "usage": {"prompt_tokens_details": {"cached_tokens": 31}},
    }
    g = Generation.from_completion(answer)
    assert g.tokens == [5, 9]
    assert g.top == [{5: -0.1, 6: -2.5}, {9: -0.2}]
    assert g.cached_tokens == 31


def test_identical_generations_agree_fully_with_zero_divergence() -> None:
    c = compare(generation([1, 2, 3, 4]), generation([1, 2, 3, 4]))
    assert (c.agreed, c.length) == (4, 4)
    assert c.kls == pytest.approx([0.0] * 4, abs=1e-12)


def test_agreement_stops_at_the_first_different_token() -> None:
    c = compare(generation([1, 2, 3, 4, 5]), generation([1, 2, 9, 4, 5]))
    assert c.agreed == 2
    assert len(c.kls) == 3  # the diverging position still has an agreed prefix


def test_divergence_grows_with_the_difference() -> None:
    slightly = {1: math.log(0.85), 2: math.log(0.08), 3: math.log(0.04)}
    assert 0 < kl_top(CONFIDENT, slightly) < kl_top(CONFIDENT, UNSURE)


def test_a_token_missing_from_the_other_top_counts_at_its_floor() -> None:
    missing = {1: math.log(0.9), 2: math.log(0.06), 4: math.log(0.01)}
    assert kl_top(CONFIDENT, missing) == pytest.approx(
        kl_top(CONFIDENT, {**missing, 3: math.log(0.01)})
    )


def test_summary_counts_identical_answers_hits_and_ratio() -> None:
    s = Summary(bytes_before=1000, bytes_after=250)
    s.add(
        [
            compare(generation([1, 2]), generation([1, 2])),
            compare(generation([1, 2]), generation([2, 2])),
        ]
    )
    assert s.agreement == pytest.approx(0.75)  # position by position: 2 + 1 of 4
    assert s.before_first_difference == pytest.approx(0.5)  # 2 + 0 of 4
    assert s.identical == 1
    assert s.cache_hits == 2
    assert s.ratio == pytest.approx(4.0)


def test_margin_is_the_exact_models_indecision_where_answers_part() -> None:
    c = compare(generation([1, 2, 3], UNSURE), generation([1, 3, 3], UNSURE))
    assert c.margin == pytest.approx(math.log(0.5) - math.log(0.3))
    assert compare(generation([1, 2]), generation([1, 2])).margin is None


def test_a_restarted_generation_decides_up_to_and_including_its_first_flip() -> None:
    reference = [1, 2, 3, 4, 5, 6]
    assert forced_steps(reference, generation([3, 9, 9, 9]), start=2) == 2
    assert forced_steps(reference, generation([3, 4, 5, 6]), start=2) == 4


def test_one_early_flip_costs_one_decision_not_the_rest_of_the_answer() -> None:
    reference = generation([1, 2, 3, 4, 5, 6])
    served = generation([1, 7, 7, 7, 7, 7])  # flips at 1, then continues its own text
    restarted = generation([3, 4, 5, 6])  # after the reference's [1, 2]
    forced = forced_generation(reference, [(0, served), (2, restarted)])
    assert forced.tokens == [1, 7, 3, 4, 5, 6]
    c = compare_forced(reference, forced)
    assert (c.matches, c.length) == (5, 6)
    assert compare(reference, served).matches == 1
    assert len(c.kls) == 6  # every position has the reference's prefix


def test_decisions_must_cover_every_reference_position_in_order() -> None:
    reference = generation([1, 2, 3, 4])
    with pytest.raises(ValueError, match="starts at 3"):
        forced_generation(reference, [(0, generation([1, 9])), (3, generation([4]))])
    with pytest.raises(ValueError, match="3 decisions for 4"):
        compare_forced(reference, forced_generation(reference, [(0, generation([1, 2, 9]))]))


def test_how_decided_counts_the_gaps_between_the_first_two_choices() -> None:
    tied = {1: math.log(0.401), 2: math.log(0.399)}  # 0.005 nats apart
    close = {1: math.log(0.52), 2: math.log(0.48)}  # 0.08 nats apart
    text = describe_margins([generation([1, 1], tied), generation([1, 1, 1, 1], close)])
    assert "6 greedy decisions" in text
    assert "under 0.01 nats at 2 (33.3%)" in text
    assert "under 0.1 nats at 6 (100.0%)" in text
    assert describe_margins([]) == "how decided the model is: no decisions"
