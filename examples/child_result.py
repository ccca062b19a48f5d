"""The one line a child process reports its result on, and how its parent finds it (the
benchmarks' and the tests' vLLM children alike).

vLLM's own processes share the child's stdout and may print on the line the
result ends (at shutdown): the parent reads the JSON value and ignores the rest.
"""

from __future__ import annotations

import json
import sys
from typing import Any

PREFIX = "RESULT "


def emit(result: Any) -> None:
    """Print `result` as the child's result line, in one write."""
    sys.stdout.write(f"{PREFIX}{json.dumps(result)}\n")
    sys.stdout.flush()


def parse(stdout: str) -> Any | None:
    """The first result in a child's stdout (None when it printed none)."""
    for line in stdout.splitlines():
        if line.startswith(PREFIX):
            value, _ = json.JSONDecoder().raw_decode(line, len(PREFIX))
            return value
    return None
