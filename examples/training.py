"""Train a small Llama on the standard library's docstrings, on the CPU, in about two minutes.

`train(recipe, tokenizer)` returns a `LlamaForCausalLM` trained from a fixed
seed: windows of the docstring stream, each starting with BOS (so the model
learns the attention sink real models have), first at a short context and
then at the full one (so attention over 1-2K tokens is trained, not
extrapolated). Mixed precision (bfloat16 autocast) where the CPU supports it.
A progress bar on a terminal, a log line every tenth of the run otherwise.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from examples import stdlib_text

#: Bumped when the training code changes what a recipe produces (rebuilds cached models).
TRAINER_VERSION = 1


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained weights; a change rebuilds the cached model."""

    hidden: int = 128
    layers: int = 4
    heads: int = 2
    kv_heads: int = 1
    intermediate: int = 512
    vocab: int = 4096
    context: int = 2048
    short_context: int = 256
    long_fraction: float = 0.15
    tokens_per_step: int = 2048
    steps: int = 280
    lr: float = 3e-3
    warmup: int = 20
    seed: int = 1234

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainStats:
    """What a training run measured, for the marker file and the log."""

    seconds: float = 0.0
    corpus_tokens: int = 0
    tokens_seen: int = 0
    first_loss: float = float("nan")
    final_loss: float = float("nan")
    held_out_loss: float = float("nan")


def token_stream(tokenizer: Any, documents: Sequence[str]) -> torch.Tensor:
    """All documents as one id stream, separated by blank lines (never by EOS)."""
    separator = tokenizer.encode("\n\n", add_special_tokens=False)
    ids: list[int] = []
    for encoded in tokenizer(list(documents), add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.extend(separator)
    return torch.tensor(ids, dtype=torch.long)


def _batches(
    stream: torch.Tensor, recipe: Recipe, bos: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    long_from = round(recipe.steps * (1 - recipe.long_fraction))
    for step in range(recipe.steps):
        length = recipe.context if step >= long_from else recipe.short_context
        rows = max(1, recipe.tokens_per_step // length)
        starts = torch.randint(0, len(stream) - length, (rows,), generator=generator)
        body = torch.stack([stream[s : s + length - 1] for s in starts.tolist()])
        yield torch.cat([torch.full((rows, 1), bos, dtype=torch.long), body], dim=1)


def _lr(step: int, recipe: Recipe) -> float:
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


class _Progress:
    """A tqdm bar on a terminal; otherwise a log line at every tenth of the steps."""

    def __init__(self, total: int, tokens_per_step: int) -> None:
        self.total = total
        self.tokens_per_step = tokens_per_step
        self.start = time.perf_counter()
        self.bar: Any = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="training tiny model", unit="step")

    def update(self, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            self.bar.update(1)
            return
        done = step + 1
        if done == 1 or done == self.total or done % max(1, self.total // 10) == 0:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / done * (self.total - done)
            print(
                f"training tiny model: step {done}/{self.total}, loss {loss:.3f}, "
                f"{done * self.tokens_per_step / elapsed:.0f} tokens/s, {eta:.0f} s left",
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _autocast_dtype() -> torch.dtype | None:
    """bfloat16 autocast where the CPU has native bfloat16 matmuls, else plain float32."""
    try:
        native = bool(torch.backends.mkldnn.is_available()) and bool(
            torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
    except (AttributeError, RuntimeError):
        native = False
    return torch.bfloat16 if native else None


def build_model(recipe: Recipe, bos: int, eos: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=recipe.vocab,
        hidden_size=recipe.hidden,
        intermediate_size=recipe.intermediate,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.kv_heads,
        max_position_embeddings=recipe.context,
        bos_token_id=bos,
        eos_token_id=eos,
        tie_word_embeddings=False,
    )
    torch.manual_seed(recipe.seed)
    return LlamaForCausalLM(config)


@torch.no_grad()
def mean_loss(model: Any, ids: torch.Tensor, autocast: torch.dtype | None) -> float:
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        return float(model(input_ids=ids, labels=ids).loss)


def train(recipe: Recipe, tokenizer: Any) -> tuple[Any, TrainStats]:
    """A model trained on the stdlib docstrings by `recipe`, and what the run measured."""
    stats = TrainStats()
    stream = token_stream(tokenizer, stdlib_text.training_documents())
    stats.corpus_tokens = len(stream)
    model = build_model(recipe, tokenizer.bos_token_id, tokenizer.eos_token_id)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0.1
    )
    autocast = _autocast_dtype()
    generator = torch.Generator().manual_seed(recipe.seed)
    progress = _Progress(recipe.steps, recipe.tokens_per_step)
    start = time.perf_counter()
    try:
        for step, batch in enumerate(_batches(stream, recipe, tokenizer.bos_token_id, generator)):
            for group in optimizer.param_groups:
                group["lr"] = _lr(step, recipe)
            with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=bool(autocast)):
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            stats.tokens_seen += batch.numel()
            value = loss.item()
            if step == 0:
                stats.first_loss = value
            stats.final_loss = value
            progress.update(step, value)
    finally:
        progress.close()
    stats.seconds = time.perf_counter() - start
    model.eval()
    held_out = tokenizer(stdlib_text.held_out_text()[:40_000])["input_ids"][: recipe.context]
    stats.held_out_loss = mean_loss(model, torch.tensor([held_out]), autocast)
    return model, stats
