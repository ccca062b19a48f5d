"""Running a codec with its C kernels and with its torch ops, for side-by-side checks."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import TypeVar

import pytest

T = TypeVar("T")


def both_ways(
    kernels: ModuleType, fn: Callable[[], T], monkeypatch: pytest.MonkeyPatch
) -> tuple[T, T]:
    """fn() with the C kernels of `kernels` (a *_native module), then with its torch ops (as
    on a GPU or without a compiler)."""
    native = fn()
    with monkeypatch.context() as m:
        m.setattr(kernels, "library", lambda: None)
        return native, fn()
