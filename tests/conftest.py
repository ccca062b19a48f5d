"""Session fixtures shared by the whole suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.models.builder import build_model

ROOT = Path(__file__).resolve().parents[1]
#: Built models are reused across runs (the builder is idempotent); ignored by git.
MODEL_CACHE = ROOT / ".models"
#: Fixtures of real Redis servers (`redis_server`, `redis_cluster`) for every module.
pytest_plugins = ["tests.redis_servers"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """A tiny random-weight Llama (hidden 128, 2 layers, 4 heads, 2 KV heads, head size 32)."""
    return build_model(MODEL_CACHE / "tiny-llama")


@pytest.fixture(scope="session")
def trained_model_dir() -> Path:
    """The walk-through's small trained Llama (trained once, about two minutes, then reused)."""
    return build_model(MODEL_CACHE / "trained-llama", "--trained")
