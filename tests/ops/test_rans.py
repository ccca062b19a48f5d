"""The two rANS coders write and read the same bytes; corrupt words are caught by both."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmc_connector.ops.codecs import rans, rans_native, rans_torch
from lmc_connector.ops.codecs.rans_tables import build_tables

NATIVE = rans_native.library()
needs_native = pytest.mark.skipif(NATIVE is None, reason="no C compiler: torch coder only")


def make_codes(
    steps_per_block: int, blocks: int, runs: int, streams: int, alphabet: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, rans.RansTables]:
    """Symbols drawn from skewed distributions, one distribution per (block, run, stream)."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(5, alphabet, generator=g) ** 6
    tables = build_tables(probs)
    dists = torch.randint(0, 5, (blocks, runs, streams), generator=g)
    cdf = probs.cumsum(1) / probs.sum(1, keepdim=True)
    u = torch.rand(blocks * steps_per_block, runs, streams, generator=g)
    per_step = dists.repeat_interleave(steps_per_block, 0)
    syms = torch.searchsorted(cdf[per_step], u.unsqueeze(-1)).squeeze(-1).clamp_max(alphabet - 1)
    return (per_step * alphabet + syms).to(torch.int16), dists, tables


def torch_encode(codes: torch.Tensor, tables: rans.RansTables) -> list[tuple[bytes, bytes]]:
    words, states = rans_torch.encode(codes, tables)
    return [
        (w.to(torch.int16).numpy().tobytes(), s.numpy().tobytes())
        for w, s in zip(words, states, strict=True)
    ]


def states_of(coded: list[tuple[bytes, bytes]]) -> torch.Tensor:
    return torch.stack(
        [torch.from_numpy(np.frombuffer(s, dtype="<u4").astype(np.int32)) for _, s in coded]
    )


CASES = [(7, 3, 1, 5, 9), (64, 2, 3, 40, 41), (1, 1, 2, 300, 64), (33, 4, 1, 1, 2)]


@needs_native
@pytest.mark.parametrize(("steps", "blocks", "runs", "streams", "alphabet"), CASES)
def test_native_and_torch_coders_write_the_same_bytes(
    steps: int, blocks: int, runs: int, streams: int, alphabet: int
) -> None:
    codes, _, tables = make_codes(steps, blocks, runs, streams, alphabet, seed=steps)
    assert NATIVE is not None
    native = [rans_native.encode_run(NATIVE, codes, r, tables) for r in range(runs)]
    assert native == torch_encode(codes, tables)


@pytest.mark.parametrize(("steps", "blocks", "runs", "streams", "alphabet"), CASES)
def test_round_trip_through_the_dispatching_coder(
    steps: int, blocks: int, runs: int, streams: int, alphabet: int
) -> None:
    codes, dists, tables = make_codes(steps, blocks, runs, streams, alphabet, seed=1)
    coded = rans.encode(codes, tables)
    syms, ok = rans.decode([w for w, _ in coded], states_of(coded), dists, steps, tables)
    assert ok
    assert torch.equal(syms.long(), codes.long() % alphabet)


@needs_native
def test_torch_decoder_reads_what_the_native_encoder_wrote() -> None:
    codes, dists, tables = make_codes(50, 2, 2, 64, 17, seed=3)
    assert NATIVE is not None
    coded = [rans_native.encode_run(NATIVE, codes, r, tables) for r in range(2)]
    flat, sizes = rans_torch.word_buffer([w for w, _ in coded], 64, torch.device("cpu"))
    syms, ok = rans_torch.decode(flat, sizes, states_of(coded), dists, 50, tables)
    assert ok and torch.equal(syms.long(), codes.long() % 17)


@pytest.mark.parametrize("cut", ["flip", "short", "long", "none"])
def test_corrupt_words_fail_the_end_state_check(cut: str) -> None:
    codes, dists, tables = make_codes(40, 2, 1, 32, 20, seed=4)
    ((words, states),) = rans.encode(codes, tables)
    if cut == "flip":
        bad = bytearray(words)
        bad[len(bad) // 2] ^= 0x55
        words = bytes(bad)
    elif cut == "short":
        words = words[:-2]
    elif cut == "none":
        words = b""
    else:
        words = words + b"\x01\x00"
    _, ok = rans.decode([words], states_of([(words, states)]), dists, 40, tables)
    assert not ok


def test_words_are_decoded_in_place_wherever_they_lie() -> None:
    """The native decoder reads a blob's words where they are, at any byte offset."""
    codes, dists, tables = make_codes(40, 2, 1, 32, 20, seed=5)
    ((words, states),) = rans.encode(codes, tables)
    for shifted in (memoryview(b"\x00" + words)[1:], memoryview(b"\x00\x00" + words)[2:]):
        syms, ok = rans.decode([shifted], states_of([(words, states)]), dists, 40, tables)
        assert ok and torch.equal(syms.long(), codes.long() % 20)


PROBE = """
import torch
from lmc_connector.ops.codecs import get_codec, rans_native
kv = torch.randn(2, 2, 16, 32).half()
codec = get_codec("cachegen")
out = codec.decode(codec.encode(kv))
print("native" if rans_native.library() is not None else "torch", out.shape == kv.shape)
"""


def run_probe(**env: str) -> str:
    """Run PROBE in a fresh interpreter (the coder is chosen once per process)."""
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**os.environ, "PYTHONPATH": str(root), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_codecs_work_with_the_native_coder_switched_off() -> None:
    assert run_probe(LMC_CODEC_NATIVE="0") == "torch True"


@needs_native
def test_an_unwritable_cache_directory_still_builds_the_native_coder() -> None:
    assert run_probe(LMC_CACHE_DIR="/proc/no-such-dir/lmc") == "native True"


def test_no_compiler_falls_back_to_the_torch_coder() -> None:
    assert run_probe(CC="/no/such/cc", PATH="/no/such/dir") == "torch True"
