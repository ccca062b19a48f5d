"""The tested vLLM range: one source for the `gpu` extra and the start-up note."""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path

import pytest

from lmc_connector.v1 import vllm_version
from lmc_connector.v1.vllm_version import note_untested_vllm, requirement, untested_note

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("version", ["0.32.0", "0.33.1", "0.33.0rc1.dev5+gabc123"])
def test_a_tested_vllm_gets_no_note(version: str) -> None:
    assert untested_note(version) is None


@pytest.mark.parametrize("version", ["0.31.2", "0.34.0", "1.0.0", "main"])
def test_a_vllm_outside_the_range_gets_a_note_naming_both(version: str) -> None:
    note = untested_note(version)
    assert note is not None and version in note and "vllm>=0.32,<0.34" in note


def test_the_gpu_extra_pins_the_same_range() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["optional-dependencies"]["gpu"] == [requirement()]


def test_the_connector_logs_the_note_once_at_start_up(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.40.0")
    note_untested_vllm.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=vllm_version.__name__):
            note_untested_vllm()
            note_untested_vllm()
    finally:
        note_untested_vllm.cache_clear()
    # One record (an earlier test may have routed the package's records to vLLM's handlers
    # too, so the capture can hold the same record twice).
    records = {id(r): r for r in caplog.records if "outside the range" in r.getMessage()}
    assert len(records) == 1
    assert "vLLM 0.40.0" in next(iter(records.values())).getMessage()
