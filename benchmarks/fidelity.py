"""Fidelity of compressed KV through real vLLM: greedy agreement and KL divergence per codec.

The walk-through's trained model (`examples/tiny_model.py`) served by vLLM with
our connector and the controller (`--no-enable-prefix-caching`, so every
hit is this cache's). For each prompt (1-2K tokens of Python's language
reference, `pydoc_data.topics`: text the model was not trained on):

1. send it: computed from scratch and cached; this answer is the reference;
2. send it again: served from the exact cached KV;
3. for each method: `POST /compress` the prompt's tokens, wait for the event,
   send the prompt again (served from the compressed cache) and compare with
   the reference; then clear the cache and send it once more, which caches
   exact KV again for the next method (and checks that recomputing gives the
   reference again), so that two codecs' errors never stack;
4. where that answer parts from the reference, send the prompt again with the
   reference's tokens up to the flip appended (its chunks still served from
   the compressed cache) and go on, until every position has been decided
   after the reference's own prefix: the teacher-forced decisions.

The first table is the answers as a user gets them: after one flip the two
continue from different texts, so an early near-tie costs the whole answer.
The second is per decision: how often the compressed KV changes the model's
next token, everything before it being equal.

Every answer is 64 greedy tokens with vLLM's top-20 logprobs; the metrics are
defined in `benchmarks/_fidelity_metrics.py`. vLLM computes in float32 by
default here (`--dtype`): in bfloat16 the logits of this small, undecided
model often tie exactly (one bfloat16 step is 0.06 nats at their size), and a
tie flips under any change of the KV at all, which would measure the ties, not
the codec. The KV cache is then float32 too: the KV ratio is against float32. A method that needs a
calibration is calibrated first (`POST /calibrate`) on chunks of other
held-out prompts. Prints a table; asserts nothing.

    python benchmarks/fidelity.py                       # 32 prompts, fp8 and cachegen
    python benchmarks/fidelity.py --prompts 8 --methods fp8
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._fidelity_metrics import (  # noqa: E402
    Generation,
    Summary,
    compare,
    compare_forced,
    describe_margins,
    forced_generation,
    forced_steps,
)
from examples import walkthrough  # noqa: E402
from lmc_connector.launch import ServiceError  # noqa: E402


@dataclass(frozen=True)
class Method:
    """A codec as this benchmark drives it: its name, its target, whether it is calibrated first."""

    name: str
    target: float
    calibrate: bool = False


#: Every codec the benchmark knows; `--methods` picks among them.
METHODS = {
    m.name: m
    for m in (
        Method("fp8", target=0.99),
        Method("cachegen", target=0.95),
        Method("kvtc", target=0.95, calibrate=True),
    )
}
EXACT_CACHED = "exact, cached"
EXACT_RECOMPUTED = "exact, recomputed"
CALIBRATION_PROMPTS = 4


def held_out_prompts(
    model_dir: Path, count: int, min_len: int, max_len: int, seed: int = 0
) -> Iterator[list[int]]:
    """Consecutive, disjoint windows of the language reference, BOS first, `min_len`..`max_len`
    tokens each (the lengths drawn from `seed`); `count` of them, then more for calibration."""
    from transformers import AutoTokenizer

    from examples.stdlib_text import held_out_text

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tokenizer(held_out_text(), add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)
    start = 0
    for _ in range(count + CALIBRATION_PROMPTS):
        length = rng.randint(min_len, max_len) - 1
        if start + length > len(ids):
            raise ValueError(f"the held-out text has {len(ids)} tokens: ask for fewer prompts")
        yield [tokenizer.bos_token_id, *ids[start : start + length]]
        start += length


class Client:
    """Requests to vLLM and to the controller, for one instance and one location."""

    def __init__(self, flow: walkthrough.Walkthrough, location: str, max_tokens: int) -> None:
        self.http = flow.http
        self.flow = flow
        self.location = location
        self.max_tokens = max_tokens

    def generate(self, prompt: list[int], max_tokens: int | None = None) -> Generation:
        body = {
            "model": self.flow.model,
            "prompt": prompt,
            "max_tokens": max_tokens or self.max_tokens,
            "temperature": 0,
            "logprobs": 20,
            "return_tokens_as_token_ids": True,
            "ignore_eos": True,
        }
        return Generation.from_completion(self._post(f"{self.flow.vllm_url}/v1/completions", body))

    def compress(self, method: str, prompt: list[int]) -> tuple[int, int]:
        """Compress the prompt's cached chunks; KV bytes before and after."""
        body = {"method": method, "location": self.location, "tokens": prompt}
        answer = self._controller("compress", body)
        if answer["num_tokens"] != len(prompt):
            raise RuntimeError(f"compress scheduled {answer['num_tokens']} of {len(prompt)} tokens")
        event = self._wait(answer["event_id"])
        workers = event.get("workers", [])
        return (
            sum(int(w.get("bytes_before", 0)) for w in workers),
            sum(int(w.get("bytes_after", 0)) for w in workers),
        )

    def calibrate(self, method: str) -> None:
        self._wait(self._controller("calibrate", {"method": method})["event_id"])

    def clear(self) -> None:
        self._controller("clear", {"location": self.location})

    def _controller(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        body = {"instance_id": self.flow.instance_id, **body}
        return self._post(f"{self.flow.controller_url}/{route}", body)

    def _wait(self, event_id: str, timeout: float = 600.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        url = f"{self.flow.controller_url}/check_finish"
        while True:
            status = self._post(url, {"event_id": event_id})
            if status["status"] in walkthrough.TERMINAL:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"event {event_id} still {status['status']} after {timeout} s")
            time.sleep(0.1)
        if status["status"] != "finished":
            raise RuntimeError(f"event {event_id} failed: {status}")
        return status

    def _post(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.http.post(url, json=body)
        if response.status_code >= 400:
            raise RuntimeError(f"POST {url} -> {response.status_code}: {response.text}")
        return dict(response.json())


def calibrate(client: Client, methods: list[Method], prompts: list[list[int]]) -> None:
    """Cache the calibration prompts, calibrate each method that needs it, clear the cache."""
    needing = [m for m in methods if m.calibrate]
    if not needing:
        return
    for prompt in prompts:
        client.generate(prompt)
    for method in needing:
        print(f"calibrating {method.name} on {len(prompts)} held-out prompts", flush=True)
        client.calibrate(method.name)
    client.clear()


def decisions(
    client: Client, prompt: list[int], reference: Generation, served: Generation
) -> Generation:
    """Step 4 of the module docstring: the served model's choice at every reference position."""
    pieces = [(0, served)]
    start = forced_steps(reference.tokens, served, 0)
    while start < len(reference.tokens):
        restarted = client.generate([*prompt, *reference.tokens[:start]],
                                    len(reference.tokens) - start)  # fmt: skip
        pieces.append((start, restarted))
        start += forced_steps(reference.tokens, restarted, start)
    return forced_generation(reference, pieces)


@dataclass
class Results:
    """Per way of serving KV: the answers as generated, and the teacher-forced decisions."""

    answers: dict[str, Summary]
    decisions: dict[str, Summary]
    references: list[Generation]


def measure(client: Client, methods: list[Method], prompts: list[list[int]]) -> Results:
    """The steps of the module docstring for every prompt."""
    rows = {EXACT_CACHED: Summary(), **{m.name: Summary() for m in methods}}
    forced = {m.name: Summary() for m in methods}
    recomputed = Summary()
    references = []
    for prompt in _progress(prompts):
        client.clear()
        reference = client.generate(prompt)
        references.append(reference)
        rows[EXACT_CACHED].add([compare(reference, client.generate(prompt))])
        for i, method in enumerate(methods):
            if i:
                client.clear()
                recomputed.add([compare(reference, client.generate(prompt))])
            before, after = client.compress(method.name, prompt)
            rows[method.name].bytes_before += before
            rows[method.name].bytes_after += after
            served = client.generate(prompt)
            rows[method.name].add([compare(reference, served)])
            forced[method.name].bytes_before += before
            forced[method.name].bytes_after += after
            chosen = decisions(client, prompt, reference, served)
            forced[method.name].add([compare_forced(reference, chosen)])
        _log(prompt, rows)
    client.clear()
    if recomputed.comparisons:
        rows[EXACT_RECOMPUTED] = recomputed
    return Results(rows, forced, references)


def _progress(prompts: list[list[int]]) -> Any:
    if not sys.stderr.isatty():
        return prompts
    from tqdm import tqdm

    return tqdm(prompts, desc="prompts", unit="prompt")


def _log(prompt: list[int], rows: dict[str, Summary]) -> None:
    if sys.stderr.isatty():
        return
    done = len(rows[EXACT_CACHED].comparisons)
    last = ", ".join(
        f"{name} {s.comparisons[-1].agreed}/{s.comparisons[-1].length}" for name, s in rows.items()
    )
    print(f"prompt {done}: {len(prompt)} tokens; tokens agreeing with exact: {last}", flush=True)


def print_table(
    title: str, rows: dict[str, Summary], methods: dict[str, Method], targets: bool
) -> None:
    """One table of summaries; `targets`: judge each method's agreement against its target."""
    print(
        f"\n{title}\n{'KV served from':<18} {'greedy agreement':>16} {'before 1st diff':>15} "
        f"{'identical':>9} {'mean KL':>9} {'KL positions':>12} {'margin':>7} "
        f"{'cache hits':>10} {'KV ratio':>8}  target"
    )
    for name, s in rows.items():
        method = methods.get(name)
        target = ""
        if method is not None and targets:
            met = "met" if s.agreement >= method.target else "NOT met"
            target = f">= {method.target:.0%}: {met}"
        ratio = f"{s.ratio:.2f}x" if s.bytes_after else "1.00x"
        n = len(s.comparisons)
        print(
            f"{name:<18} {s.agreement:>16.2%} {s.before_first_difference:>15.2%} "
            f"{s.identical:>5}/{n:<3} {s.mean_kl:>9.2e} {s.kl_positions:>12} "
            f"{s.mean_margin:>7.3f} {s.cache_hits:>6}/{n:<3} {ratio:>8}  {target}"
        )


def print_results(results: Results, methods: dict[str, Method], generated: int) -> None:
    print_table(f"1. answers: {generated} greedy tokens, as generated", results.answers, methods,
                targets=True)  # fmt: skip
    print_table("2. decisions: each position after the reference's own tokens (teacher-forced)",
                results.decisions, methods, targets=False)  # fmt: skip
    print(
        f"greedy agreement: share of the {generated} tokens equal to the reference's at the "
        "same position;\nbefore 1st diff: share before the first that differs; identical: answers "
        "equal to the reference;\nmean KL: KL(exact || served) over the top-20 logprobs, at every "
        "position whose prefix agrees\n(in table 2, every position);\nmargin: mean gap (nats) "
        "between the exact model's first two choices where the answers first part;\ncache hits: "
        "answers whose prompt was served from the cache; KV ratio: bytes before / after compress."
    )
    print(describe_margins(results.references))


@dataclass(frozen=True)
class Workload:
    """What a fidelity run measures: the model, the methods, the held-out prompts (and the
    further ones for calibration), from the options `add_workload_options` added."""

    model_dir: Path
    methods: list[Method]
    prompts: list[list[int]]
    calibration: list[list[int]]
    generate: int


def add_workload_options(parser: argparse.ArgumentParser, methods: str) -> None:
    parser.add_argument("--model", type=Path, default=walkthrough.DEFAULT_MODEL_DIR)
    parser.add_argument("--methods", default=methods, help=f"of {', '.join(METHODS)}")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--min-len", type=int, default=1024, help="shortest prompt, tokens")
    parser.add_argument("--max-len", type=int, default=None, help="default: model length - 64")
    parser.add_argument("--generate", type=int, default=64, help="greedy tokens per answer")


def workload(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Workload:
    """The workload the options ask for (the model trained first if missing); a mistake in
    them ends the program with `parser.error`."""
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}: choose among {', '.join(METHODS)}")
    model_dir = walkthrough.build_model_if_missing(args.model.resolve())
    model_len = walkthrough.max_model_len(model_dir)
    max_len = args.max_len or model_len - args.generate
    if max_len + args.generate > model_len or args.min_len > max_len:
        parser.error(f"prompts of {args.min_len}..{max_len} tokens + {args.generate} generated "
                     f"do not fit the model's {model_len}")  # fmt: skip
    everything = list(held_out_prompts(model_dir, args.prompts, args.min_len, max_len))
    return Workload(
        model_dir,
        [METHODS[m] for m in args.methods.split(",")],
        everything[: args.prompts],
        everything[args.prompts :],
        args.generate,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add_workload_options(parser, methods="fp8,cachegen")
    parser.add_argument("--location", default="LocalCPUBackend")
    parser.add_argument("--dtype", default="float32", help="vLLM's --dtype; auto: the model's")
    parser.add_argument("--log-dir", type=Path, default=None, help="keep service logs here")
    args = parser.parse_args()
    work = workload(parser, args)
    methods, prompts, model_dir = work.methods, work.prompts, work.model_dir
    print(
        f"model {model_dir.name} (dtype {args.dtype}); {len(prompts)} prompts of "
        f"{min(map(len, prompts))}..{max(map(len, prompts))} tokens; "
        f"{work.generate} greedy tokens each; "
        f"methods {', '.join(m.name for m in methods)}",
        flush=True,
    )
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="lmc-fidelity-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    ports = walkthrough.Ports.free()
    config = walkthrough.config_for_ports(ROOT / "examples" / "example.yaml", ports, log_dir)
    start = time.perf_counter()
    try:
        extra = ("--dtype", args.dtype)
        with walkthrough.started(model_dir, config, ports, log_dir, "trained", extra) as (flow, _):
            client = Client(flow, args.location, work.generate)
            calibrate(client, methods, work.calibration)
            results = measure(client, methods, prompts)
    except (RuntimeError, ServiceError, httpx.HTTPError) as e:
        print(f"\nFAILED: {e}\nlogs: {log_dir}")
        return 1
    print_results(results, METHODS, work.generate)
    print(f"({time.perf_counter() - start:.0f} s; logs: {log_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
