"""The vLLM releases this connector is tested with, and the start-up note when vLLM is another.

`pyproject.toml`'s `gpu` extra pins the same range (a test keeps the two equal).
A vLLM outside it is not refused: the connector may well work, and the log says why
it might not.
"""

from __future__ import annotations

import functools
import logging
import re

logger = logging.getLogger(__name__)

#: Tested vLLM releases, as (major, minor): at least the first, below the second.
TESTED_VLLM = ((0, 32), (0, 34))


def requirement() -> str:
    """The range as a pip requirement, e.g. "vllm>=0.32,<0.34"."""
    (lo_major, lo_minor), (hi_major, hi_minor) = TESTED_VLLM
    return f"vllm>={lo_major}.{lo_minor},<{hi_major}.{hi_minor}"


def untested_note(version: str) -> str | None:
    """A log line for a vLLM `version` outside the tested range; None inside it."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        return f"vLLM reports version {version!r}; lmc_connector is tested with {requirement()}"
    found = (int(match.group(1)), int(match.group(2)))
    low, high = TESTED_VLLM
    if low <= found < high:
        return None
    return (
        f"vLLM {version} is outside the range lmc_connector is tested with "
        f"({requirement()}); it may work, but report problems with both versions"
    )


@functools.cache
def note_untested_vllm() -> None:
    """Log once per process, at start-up, when the installed vLLM is outside the tested range."""
    import vllm

    note = untested_note(str(getattr(vllm, "__version__", "unknown")))
    if note is not None:
        logger.warning(note)
