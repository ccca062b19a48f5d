"""What the seed walk-through saw, the promises it checks, and how it prints them."""

from __future__ import annotations

import functools
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


def say(text: str) -> None:
    print(text, flush=True)


#: The KV each completion of `run_steps` is served from, in order.
SOURCES = ("exact (computed)", "compressed", "decompressed")


@dataclass
class Report:
    num_tokens: int = 0
    expect_words: bool = False
    outputs: list[str] = field(default_factory=list)
    cached_tokens: list[int] = field(default_factory=list)
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    scheduled: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    #: What a user's mistakes got back: name -> [HTTP status, the controller's message].
    mistakes: dict[str, tuple[int, str]] = field(default_factory=dict)

    def save(self, path: Path, problems: list[str]) -> None:
        """The report as JSON, with the broken promises (`problems`), for scripts and tests."""
        path.write_text(json.dumps({**asdict(self), "problems": problems}, indent=1))


def _bytes(event: dict[str, Any], key: str) -> int:
    return sum(int(worker.get(key, 0)) for worker in event.get("workers", []))


def print_report(report: Report, method: str) -> None:
    compress = report.events.get("compress", {})
    before, after = _bytes(compress, "bytes_before"), _bytes(compress, "bytes_after")
    ratio = f"{before / after:.2f}x" if after else "n/a"
    say("\n== report")
    say(f"    prompt tokens                 {report.num_tokens}")
    say(f"    compress scheduled tokens     {report.scheduled.get('compress')}")
    say(f"    decompress scheduled tokens   {report.scheduled.get('decompress')}")
    say(f"    KV bytes before -> after      {before} -> {after} ({method}, ratio {ratio})")
    say("    answers side by side (greedy, 10 tokens):")
    say(f"      {'KV served from':<24} {'cached':>6}  {'same as exact':<13}  text")
    rows = zip(SOURCES, report.cached_tokens, report.outputs, strict=False)
    for i, (source, cached, text) in enumerate(rows):
        label = f"{source} ({method})" if i else source
        same = "-" if i == 0 else "yes" if text == report.outputs[0] else "no"
        say(f"      {label:<24} {cached:>6}  {same:<13}  {text!r}")
    say(
        "    (the compressed and the decompressed cache hold the same approximation and give\n"
        "     the same answer; a lossy method may differ from exact KV: benchmarks/fidelity.py\n"
        "     measures how often, over many long prompts)"
    )
    for name, seconds in report.seconds.items():
        say(f"    time: {name:<55} {seconds * 1e3:8.1f} ms")
    for name, (status, detail) in report.mistakes.items():
        say(f"    mistake: {name:<20} -> {status} {detail[:90]}")


def is_words(text: str, min_words: int = 3) -> bool:
    """Whether `text` reads as English: enough words, nearly all of them known to Python's docs."""
    words = re.findall(r"[A-Za-z]+", text)
    if len(words) < min_words:
        return False
    known = sum(w.lower() in _doc_words() for w in words)
    return known >= 0.8 * len(words)


@functools.cache
def _doc_words() -> frozenset[str]:
    from examples.stdlib_text import held_out_text

    return frozenset(w.lower() for w in re.findall(r"[A-Za-z]+", held_out_text()))


#: Each mistake the walk-through makes on purpose, and what its answer must name.
MISTAKE_FIX = {
    "unknown instance": "lmcache_default_instance",
    "misspelled method": "did you mean cachegen",
    "unknown location": "LocalCPUBackend",
}


def check(report: Report) -> list[str]:
    """What the seed page promises, as a list of broken promises (empty when all hold)."""
    problems = []
    for kind in ("compress", "decompress"):
        if report.scheduled.get(kind) != report.num_tokens:
            problems.append(
                f"{kind} scheduled {report.scheduled.get(kind)} tokens, prompt has "
                f"{report.num_tokens}"
            )
    if len(report.cached_tokens) == 3 and not all(c > 0 for c in report.cached_tokens[1:]):
        problems.append(f"requests after compress/decompress not cached: {report.cached_tokens}")
    if len(set(report.outputs[1:])) > 1:
        problems.append(
            f"compressed and decompressed caches answered differently: {report.outputs}"
        )
    if report.expect_words and not all(is_words(text) for text in report.outputs):
        problems.append(f"a trained model should answer in words: {report.outputs}")
    for name, (status, detail) in report.mistakes.items():
        if not 400 <= status < 500 or MISTAKE_FIX[name] not in detail:
            problems.append(f"mistake '{name}' got {status} without naming the fix: {detail}")
    return problems
