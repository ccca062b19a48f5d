"""English text for prompts: Python's own language reference (ships with every Python)."""

from __future__ import annotations

from pydoc_data.topics import topics


def sample_text(num_words: int, start: int = 0) -> str:
    """`num_words` words of the reference, from word `start` on (deterministic)."""
    words = " ".join(topics[k] for k in sorted(topics)).split()
    return " ".join(words[start : start + num_words])
