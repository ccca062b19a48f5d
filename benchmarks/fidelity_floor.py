"""The floor under `fidelity.py`: how many greedy answers survive KV that is only rounded.

`fidelity.py` measures each codec through vLLM. Whether its target can be met
at all depends on the model: where the model's first two choices nearly tie,
any change of the KV tips them. This measures that offline, in transformers
(float32, CPU), with the same model, the same held-out prompts and the
connector's chunking. Each prompt is run once; its KV is then served back,
chunk by chunk, for every token but the last (as the connector serves a hit):

- exactly: the reference;
- rounded to float16 and to bfloat16: storage formats, not codecs, with 11
  and 8 significant bits (fp8 keeps 4);
- through each codec's encode and decode; kvtc at several
  qualities, calibrated on chunks of other held-out prompts as `POST
  /calibrate` does.

Over each, the prompt's last token and 64 greedy tokens, compared as
`fidelity.py` compares them, and the teacher-forced decisions (the reference's
tokens in one pass over the served KV). Last, how decided the model is: the
gaps between its first two choices along the reference answers. Prints
tables; asserts nothing.

    python benchmarks/fidelity_floor.py                 # the walk-through's trained model
    python benchmarks/fidelity_floor.py --model DIR --prompts 16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._fidelity_metrics import (  # noqa: E402
    Generation,
    Summary,
    compare,
    compare_forced,
    describe_margins,
)
from benchmarks._round_trips import RoundTrip, rounded, through_codec  # noqa: E402
from benchmarks.fidelity import (  # noqa: E402
    METHODS,
    Method,
    add_workload_options,
    print_table,
    workload,
)
from lmc_connector.config import CacheConfig  # noqa: E402
from lmc_connector.ops.codecs import fit_calibration  # noqa: E402
from lmc_connector.ops.codecs.kvtc import DEFAULT_QUALITY  # noqa: E402

#: About 8x against float16 on the trained model, and the quality /compress serves.
KVTC_QUALITIES = (2.0, DEFAULT_QUALITY)
TOP = 20


class Model:
    """A causal LM in float32 on the CPU, and the shape of its KV (read-only after loading)."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.lm = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        config = self.lm.config
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )

    @torch.no_grad()
    def kv(self, prompt: list[int]) -> torch.Tensor:
        """The KV of `prompt` as the connector stores it: [K/V, layers, tokens, channels]."""
        cache = self.lm(torch.tensor([prompt]), use_cache=True).past_key_values
        planes = [
            torch.stack([self._rows(layer.keys) for layer in cache.layers]),
            torch.stack([self._rows(layer.values) for layer in cache.layers]),
        ]
        return torch.stack(planes)

    def _rows(self, heads: torch.Tensor) -> torch.Tensor:
        """[1, kv heads, tokens, head dim] -> [tokens, kv heads * head dim]."""
        return heads[0].transpose(0, 1).reshape(heads.shape[2], -1)

    def as_cache(self, kv: torch.Tensor) -> object:
        from transformers import DynamicCache

        cache = DynamicCache()
        tokens = kv.shape[2]
        for layer in range(kv.shape[1]):
            k, v = (kv[p, layer].reshape(tokens, self.kv_heads, self.head_dim) for p in (0, 1))
            cache.update(k.transpose(0, 1)[None].clone(), v.transpose(0, 1)[None].clone(), layer)
        return cache

    @torch.no_grad()
    def generate(self, kv: torch.Tensor, rest: list[int], count: int) -> Generation:
        """Greedy tokens after the prefix's KV `kv` and the prompt's `rest`, with top logprobs."""
        cache, step = self.as_cache(kv), torch.tensor([rest])
        tokens: list[int] = []
        top: list[dict[int, float]] = []
        for _ in range(count):
            out = self.lm(step, past_key_values=cache, use_cache=True)
            logprobs = out.logits[0, -1].log_softmax(-1)
            tokens.append(int(logprobs.argmax()))
            top.append(_top(logprobs))
            cache, step = out.past_key_values, torch.tensor([[tokens[-1]]])
        return Generation(tokens, top, cached_tokens=kv.shape[2])

    @torch.no_grad()
    def decide(self, kv: torch.Tensor, rest: list[int], reference: list[int]) -> Generation:
        """The model's choice at each of the reference's positions, the reference's own
        tokens before it (teacher-forced), in one pass over the prefix's KV `kv`."""
        step = torch.tensor([[*rest, *reference[:-1]]])
        logits = self.lm(step, past_key_values=self.as_cache(kv)).logits[0, len(rest) - 1 :]
        logprobs = logits.log_softmax(-1)
        return Generation(
            [int(t) for t in logprobs.argmax(-1)],
            [_top(row) for row in logprobs],
            cached_tokens=kv.shape[2],
        )


def _top(logprobs: torch.Tensor) -> dict[int, float]:
    values, ids = logprobs.topk(TOP)
    return {int(i): float(v) for i, v in zip(ids, values, strict=True)}


def served(kv: torch.Tensor, chunk_size: int, way: RoundTrip) -> tuple[torch.Tensor, int]:
    """`kv` chunk by chunk through `way`: the KV as served, and its bytes."""
    pieces, size = [], 0
    for start in range(0, kv.shape[2], chunk_size):
        piece, nbytes = way(kv[:, :, start : start + chunk_size].contiguous())
        pieces.append(piece)
        size += nbytes
    return torch.cat(pieces, 2), size


def ways_to_serve(
    model: Model, calibration: list[list[int]], chunk_size: int, methods: list[Method]
) -> tuple[dict[str, RoundTrip], dict[str, Method]]:
    """Every way of serving the KV, and the target of those that are codecs."""
    ways = {"float16 (rounded)": rounded(torch.float16),
            "bfloat16 (rounded)": rounded(torch.bfloat16)}  # fmt: skip
    targets: dict[str, Method] = {}
    for method in methods:
        name = method.name
        if not method.calibrate:
            ways[name], targets[name] = through_codec(name), method
            continue
        samples = [
            chunk
            for prompt in calibration
            for chunk in model.kv(prompt).split(chunk_size, dim=2)
            if chunk.shape[2] == chunk_size
        ]
        print(f"calibrating {name} on {len(samples)} chunks of other held-out prompts", flush=True)
        blob = fit_calibration(name, samples)
        for quality in KVTC_QUALITIES:
            label = f"{name} q{quality:g}"
            ways[label] = through_codec(name, calibration=blob, quality=quality)
            targets[label] = method
    return ways, targets


def measure(
    model: Model,
    prompts: list[list[int]],
    ways: dict[str, RoundTrip],
    chunk_size: int,
    generate: int,
) -> tuple[dict[str, Summary], dict[str, Summary], list[Generation]]:
    """Answers and teacher-forced decisions per way, and the reference answers."""
    answers = {name: Summary() for name in ways}
    decisions = {name: Summary() for name in ways}
    references: list[Generation] = []
    start = time.perf_counter()
    for n, prompt in enumerate(prompts, 1):
        exact, last = model.kv(prompt), prompt[-1:]
        reference = model.generate(exact[:, :, :-1], last, generate)
        references.append(reference)
        for name, way in ways.items():
            kv, nbytes = served(exact, chunk_size, way)
            kv = kv[:, :, :-1]
            for table, other in (
                (answers, compare(reference, model.generate(kv, last, generate))),
                (decisions, compare_forced(reference, model.decide(kv, last, reference.tokens))),
            ):
                table[name].add([other])
                table[name].bytes_before += exact.numel() * exact.element_size()
                table[name].bytes_after += nbytes
        rate = n / (time.perf_counter() - start)
        print(f"prompt {n}/{len(prompts)}: {len(prompt)} tokens ({rate:.2f} prompts/s)", flush=True)
    return answers, decisions, references


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add_workload_options(parser, methods=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = workload(parser, args)
    prompts, generate = work.prompts, work.generate
    chunk_size = CacheConfig().chunk_size
    print(
        f"model {work.model_dir.name} (float32, transformers, offline); {len(prompts)} prompts "
        f"of {min(map(len, prompts))}..{max(map(len, prompts))} tokens; {generate} greedy "
        f"tokens each; chunks of {chunk_size} tokens; {torch.get_num_threads()} torch threads",
        flush=True,
    )
    model = Model(work.model_dir)
    ways, targets = ways_to_serve(model, work.calibration, chunk_size, work.methods)
    start = time.perf_counter()
    answers, decisions, references = measure(model, prompts, ways, chunk_size, generate)
    print_table(f"1. answers: {generate} greedy tokens, as generated", answers, targets,
                targets=True)  # fmt: skip
    print_table("2. decisions: each position after the reference's own tokens (teacher-forced)",
                decisions, targets, targets=False)  # fmt: skip
    print(
        "columns as in fidelity.py; KV ratio: float32 bytes / bytes as served (2x less against "
        f"float16);\nkvtc q{DEFAULT_QUALITY:g} is what /compress serves; the rounded rows are "
        "the floor: a codec coarser than a format cannot be expected to agree more."
    )
    print(describe_margins(references))
    print(f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
