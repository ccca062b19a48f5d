"""Tiny Llamas that vLLM can serve on a CPU, built offline.

`build_trained_model(path)` trains a byte-level BPE tokenizer and a small
Llama (hidden 128, 4 layers, head size 64, 2K context) on the standard
library's docstrings, in about two minutes on 2 cores, and saves both in
bfloat16: its attention is a trained model's and its greedy answers are
English words. The walk-through and the fidelity benchmark use it.

`build_tiny_model(path)` does the same in about a second with random weights
(hidden 128, 2 layers): meaningless text but real, deterministic computation,
enough to prove that cached KV is bit-identical to recomputed KV (the tests).

`write_config_only_model(path, ...)` writes a bigger model as `config.json`
plus the tokenizer only, to be served with `--load-format dummy` (used by the
time-to-first-token benchmark).

All are idempotent: an existing, complete directory is reused; a marker file
records the recipe, and a changed recipe rebuilds.

    python -m examples.tiny_model /tmp/trained-llama --trained
    python -m examples.tiny_model /tmp/tiny-llama
    python -m examples.tiny_model /tmp/bench-llama --config-only --hidden 2048 --layers 16
"""

from __future__ import annotations

import argparse
import fcntl
import inspect
import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any

from examples.training import TRAINER_VERSION, Recipe

TINY_SEED = 1234
TINY_VOCAB = 1024
_DOC_MODULES = ("argparse", "collections", "json", "logging", "pathlib", "subprocess", "typing")
_MARKER = "tiny_model.json"
#: What the training run measured (time, losses), beside the marker; not part of the recipe.
TRAINING_STATS = "training.json"


def _training_text() -> list[str]:
    """Docstrings of a few standard-library modules: local, stable, English text."""
    import importlib

    texts: list[str] = []
    for name in _DOC_MODULES:
        module = importlib.import_module(name)
        for obj in vars(module).values():
            doc = inspect.getdoc(obj)
            if doc:
                texts.append(doc)
    return texts


def sample_text(num_words: int, start: int = 0) -> str:
    """Deterministic English-ish text of about `num_words` words from word `start` on."""
    words = " ".join(_training_text()).split()
    reps = (start + num_words) // max(len(words), 1) + 1
    return " ".join((words * reps)[start : start + num_words])


def _make_tokenizer(vocab_size: int, texts: list[str], add_bos: bool = False) -> Any:
    """A byte-level BPE trained on `texts`; with `add_bos`, every encoding starts with <s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _save_tokenizer(path: Path, vocab_size: int) -> None:
    _make_tokenizer(vocab_size, _training_text()).save_pretrained(str(path))


def _llama_config(
    vocab_size: int,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    max_positions: int,
) -> object:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=0,
        eos_token_id=1,
        dtype="float32",
        tie_word_embeddings=False,
    )


def _is_complete(path: Path, spec: dict[str, object]) -> bool:
    marker = path / _MARKER
    return marker.is_file() and json.loads(marker.read_text()) == spec


def build_tiny_model(
    path: str | os.PathLike[str],
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    max_positions: int = 4096,
    seed: int = TINY_SEED,
) -> Path:
    """Write (or reuse) a tiny random-weight Llama and its tokenizer under `path`.

    head size = hidden / heads (32 by default: the CPU attention backend needs
    one of 32, 64, 80, ...). The weights are float32 on disk; serve with
    `dtype="float32"` or let vLLM cast.
    """
    import torch
    from transformers import LlamaForCausalLM

    out = Path(path)
    spec: dict[str, object] = {
        "kind": "weights",
        "hidden": hidden,
        "layers": layers,
        "heads": heads,
        "kv_heads": kv_heads,
        "max_positions": max_positions,
        "seed": seed,
        "vocab": TINY_VOCAB,
    }
    if _is_complete(out, spec):
        return out
    out.mkdir(parents=True, exist_ok=True)
    _save_tokenizer(out, TINY_VOCAB)
    config = _llama_config(TINY_VOCAB, hidden, layers, heads, kv_heads, 2 * hidden, max_positions)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(out), safe_serialization=True)
    (out / _MARKER).write_text(json.dumps(spec))
    return out


def trained_spec(recipe: Recipe | None = None) -> dict[str, object]:
    """The marker of a trained model: its recipe and the Python whose stdlib it learned."""
    return {
        "kind": "trained",
        "recipe": (recipe or Recipe()).as_dict(),
        "trainer": TRAINER_VERSION,
        "python": platform.python_version(),
    }


def build_trained_model(path: str | os.PathLike[str], recipe: Recipe | None = None) -> Path:
    """Write (or reuse) the small trained Llama and its tokenizer under `path`.

    Trains for about two minutes on 2 cores the first time (progress on stderr)
    and saves bfloat16 weights; later calls return at once. Concurrent callers
    wait for one build (a file lock beside `path`); a half-written build is
    never mistaken for a complete one (it is written aside, then renamed).
    """
    recipe = recipe or Recipe()
    out = Path(path)
    spec = trained_spec(recipe)
    if _is_complete(out, spec):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_complete(out, spec):
            return out
        staging = out.parent / f".{out.name}.building"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        _train_into(staging, out.name, recipe)
        (staging / _MARKER).write_text(json.dumps(spec))
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    return out


def _train_into(folder: Path, name: str, recipe: Recipe) -> None:
    import torch

    from examples import stdlib_text, training

    print(f"training a small Llama for {name} (once; about two minutes)", flush=True)
    docs = list(stdlib_text.training_documents())
    tokenizer = _make_tokenizer(recipe.vocab, docs, add_bos=True)
    model, stats = training.train(recipe, tokenizer)
    model.config.dtype = torch.bfloat16
    model.to(torch.bfloat16).save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    (folder / TRAINING_STATS).write_text(json.dumps(vars(stats), indent=1))
    print(
        f"trained in {stats.seconds:.0f} s on {stats.tokens_seen} tokens: loss "
        f"{stats.first_loss:.2f} -> {stats.final_loss:.2f}, held-out {stats.held_out_loss:.2f}",
        flush=True,
    )


def model_kind(path: str | os.PathLike[str]) -> str | None:
    """`trained`, `weights` (random), `config-only`, or None for a model not built here."""
    marker = Path(path) / _MARKER
    return str(json.loads(marker.read_text())["kind"]) if marker.is_file() else None


def write_config_only_model(
    path: str | os.PathLike[str],
    hidden: int = 2048,
    layers: int = 16,
    heads: int = 16,
    kv_heads: int = 4,
    intermediate: int = 5632,
    max_positions: int = 8192,
) -> Path:
    """Write `config.json` and the tokenizer only: serve with `--load-format dummy`."""
    out = Path(path)
    spec: dict[str, object] = {
        "kind": "config-only",
        "hidden": hidden,
        "layers": layers,
        "heads": heads,
        "kv_heads": kv_heads,
        "intermediate": intermediate,
        "max_positions": max_positions,
        "vocab": TINY_VOCAB,
    }
    if _is_complete(out, spec):
        return out
    out.mkdir(parents=True, exist_ok=True)
    _save_tokenizer(out, TINY_VOCAB)
    config = _llama_config(TINY_VOCAB, hidden, layers, heads, kv_heads, intermediate, max_positions)
    config.save_pretrained(str(out))  # type: ignore[attr-defined]
    (out / _MARKER).write_text(json.dumps(spec))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("path", help="directory to write (reused when already complete)")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--trained", action="store_true", help="the trained model (about 2 min)")
    kind.add_argument("--config-only", action="store_true", help="no weights: --load-format dummy")
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument(
        "--recipe", type=Path, default=None, help="with --trained: a JSON file of Recipe fields"
    )
    args = parser.parse_args(argv)
    given = {
        k: v
        for k, v in (
            ("hidden", args.hidden),
            ("layers", args.layers),
            ("heads", args.heads),
            ("kv_heads", args.kv_heads),
        )
        if v is not None
    }
    if args.trained:
        if given:
            parser.error("the trained model's shape is its recipe (examples/training.py)")
        recipe = Recipe(**json.loads(args.recipe.read_text())) if args.recipe else None
        out = build_trained_model(args.path, recipe)
    elif args.config_only:
        out = write_config_only_model(args.path, **given)
    else:
        out = build_tiny_model(args.path, **given)
    print(out)


if __name__ == "__main__":
    main()
