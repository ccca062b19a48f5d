"""The fidelity floor's harness on the tiny random-weight model: KV taken out of transformers
and served back gives the model's own logits, chunk by chunk as the connector stores it."""

from pathlib import Path

import pytest
import torch

from benchmarks._round_trips import rounded, through_codec
from benchmarks.fidelity import held_out_prompts
from benchmarks.fidelity_floor import Model, served

CHUNK = 128


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> Model:
    return Model(tiny_model_dir)


@pytest.fixture(scope="module")
def prompt(tiny_model_dir: Path) -> list[int]:
    return next(held_out_prompts(tiny_model_dir, 1, 300, 400))


def own_logprobs(model: Model, tokens: list[int]) -> torch.Tensor:
    """The model's log-probabilities after each of `tokens`, in one pass without a cache."""
    with torch.no_grad():
        return model.lm(torch.tensor([tokens])).logits[0].log_softmax(-1)


def test_exact_kv_served_back_gives_the_models_own_next_token_logprobs(
    model: Model, prompt: list[int]
) -> None:
    kv = model.kv(prompt)
    assert kv.shape[:3] == (2, model.lm.config.num_hidden_layers, len(prompt))
    answer = model.generate(kv[:, :, :-1], prompt[-1:], 4)
    expected = own_logprobs(model, [*prompt, *answer.tokens[:-1]])[len(prompt) - 1 :]
    for position, top in enumerate(answer.top):
        assert answer.tokens[position] == max(top, key=top.__getitem__)
        for token, logprob in top.items():
            assert logprob == pytest.approx(float(expected[position, token]), abs=1e-4)


def test_teacher_forced_decisions_are_the_models_choices_after_the_references_tokens(
    model: Model, prompt: list[int]
) -> None:
    kv = model.kv(prompt)[:, :, :-1]
    reference = [5, 17, 3, 99, 42]  # any tokens: the decisions follow them, not their own
    decided = model.decide(kv, prompt[-1:], reference)
    expected = own_logprobs(model, [*prompt, *reference[:-1]])[len(prompt) - 1 :]
    assert len(decided.tokens) == len(reference)
    assert decided.tokens == [int(t) for t in expected.argmax(-1)]


def test_kv_is_served_chunk_by_chunk_with_a_trailing_partial_chunk(prompt: list[int]) -> None:
    kv = torch.randn(2, 3, len(prompt), 8)
    shapes: list[int] = []

    def record(chunk: torch.Tensor) -> tuple[torch.Tensor, int]:
        shapes.append(chunk.shape[2])
        return chunk, 1

    out, nbytes = served(kv, CHUNK, record)
    assert torch.equal(out, kv)
    assert shapes == [CHUNK] * (len(prompt) // CHUNK) + [len(prompt) % CHUNK]
    assert nbytes == len(shapes)


def test_rounded_and_coded_kv_is_close_and_counts_its_bytes(
    model: Model, prompt: list[int]
) -> None:
    kv = model.kv(prompt)
    half, half_bytes = served(kv, CHUNK, rounded(torch.float16))
    assert half_bytes == kv.numel() * 2
    assert torch.allclose(half, kv, rtol=2**-10, atol=1e-6)
    fp8, fp8_bytes = served(kv, CHUNK, through_codec("fp8"))
    assert kv.numel() < fp8_bytes < kv.numel() * 2  # one byte a value, plus scales and headers
    assert 0 < (fp8 - kv).norm() / kv.norm() < 0.05
