"""The trained-model builder with a recipe small enough to train in seconds."""

import json
from pathlib import Path

import pytest

from examples import tiny_model, training
from examples.training import Recipe
from examples.walkthrough import is_words

SMALL = Recipe(hidden=64, layers=1, heads=1, kv_heads=1, intermediate=128, vocab=512,
               context=64, short_context=32, tokens_per_step=64, steps=2, warmup=1)  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model.build_trained_model(tmp_path_factory.mktemp("models") / "small", SMALL)


def test_the_model_loads_in_bfloat16_with_a_tokenizer_that_starts_with_bos(built: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(built))
    tokenizer = AutoTokenizer.from_pretrained(str(built))
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config.vocab_size == len(tokenizer) == SMALL.vocab
    assert tokenizer("Return the list.")["input_ids"][0] == tokenizer.bos_token_id
    assert tiny_model.model_kind(built) == "trained"


def test_training_stats_are_recorded_beside_the_weights(built: Path) -> None:
    stats = json.loads((built / tiny_model.TRAINING_STATS).read_text())
    assert stats["tokens_seen"] == SMALL.steps * SMALL.tokens_per_step
    assert stats["final_loss"] > 0


def test_a_complete_build_is_reused(built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_training(*args: object) -> None:
        raise AssertionError("trained again")

    monkeypatch.setattr(training, "train", no_training)
    assert tiny_model.build_trained_model(built, SMALL) == built


def test_a_changed_recipe_rebuilds(built: Path, tmp_path: Path) -> None:
    copy = tmp_path / "small"
    copy.mkdir()
    (copy / "tiny_model.json").write_text((built / "tiny_model.json").read_text())
    changed = Recipe(**{**SMALL.as_dict(), "steps": 3})
    tiny_model.build_trained_model(copy, changed)
    stats = json.loads((copy / tiny_model.TRAINING_STATS).read_text())
    assert stats["tokens_seen"] == 3 * SMALL.tokens_per_step
    assert tiny_model.model_kind(copy) == "trained"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (" the function returns a list of the arguments", True),
        ("", False),
        (" ationalxq rkkp vvbnt ozzq", False),
        ("\n\n\n", False),
    ],
)
def test_words_are_told_from_fragments(text: str, words: bool) -> None:
    assert is_words(text) is words
