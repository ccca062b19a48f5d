"""The example model builder, run as users run it, with a recipe small enough for seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.models.builder import build_model

SMALL = {
    "hidden": 64,
    "layers": 1,
    "heads": 1,
    "kv_heads": 1,
    "intermediate": 128,
    "vocab": 512,
    "context": 64,
    "short_context": 32,
    "tokens_per_step": 64,
    "steps": 2,
    "warmup": 1,
}
STATS = "training.json"


def train(path: Path, recipe: dict[str, int]) -> Path:
    recipe_file = path.parent / f"{path.name}-recipe.json"
    recipe_file.write_text(json.dumps(recipe))
    return build_model(path, "--trained", "--recipe", str(recipe_file))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(tmp_path_factory.mktemp("models") / "small", SMALL)


def test_the_model_loads_in_bfloat16_with_a_tokenizer_that_starts_with_bos(built: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(built))
    tokenizer = AutoTokenizer.from_pretrained(str(built))
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config.vocab_size == len(tokenizer) == SMALL["vocab"]
    assert tokenizer("Return the list.")["input_ids"][0] == tokenizer.bos_token_id
    assert json.loads((built / "tiny_model.json").read_text())["kind"] == "trained"


def test_training_stats_are_recorded_beside_the_weights(built: Path) -> None:
    stats = json.loads((built / STATS).read_text())
    assert stats["tokens_seen"] == SMALL["steps"] * SMALL["tokens_per_step"]
    assert stats["final_loss"] > 0


def test_a_complete_build_is_reused(built: Path) -> None:
    trained_at = (built / STATS).stat().st_mtime_ns
    assert train(built, SMALL) == built
    assert (built / STATS).stat().st_mtime_ns == trained_at


def test_a_changed_recipe_rebuilds(built: Path, tmp_path: Path) -> None:
    copy = tmp_path / "small"
    copy.mkdir()
    (copy / "tiny_model.json").write_text((built / "tiny_model.json").read_text())
    train(copy, {**SMALL, "steps": 3})
    stats = json.loads((copy / STATS).read_text())
    assert stats["tokens_seen"] == 3 * SMALL["tokens_per_step"]
