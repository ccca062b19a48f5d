"""Test code run the way vLLM's CPU worker runs its model-runner thread: bound to one core.

A thread inherits the CPU mask of the thread that starts it, so what the connector starts
from there (its own threads, a codec's pool) shares that core unless it widens its mask.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def on_one_core(fn: Callable[[], T], timeout: float = 60) -> T:
    """fn() on a new thread bound to one CPU (the lowest this process may use); fails when
    fn raised or did not return within `timeout` seconds."""
    result: list[T] = []

    def bound() -> None:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        result.append(fn())

    thread = threading.Thread(target=bound, name="bound-to-one-core")
    thread.start()
    thread.join(timeout=timeout)
    assert result, "the thread bound to one core did not return (its error is logged above)"
    return result[0]
