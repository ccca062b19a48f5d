import os
import subprocess
import sys

import pytest

from lmc_connector.tokens import chunk_bounds, chunk_hashes


def test_trailing_partial_chunk_gets_a_hash() -> None:
    assert len(chunk_hashes(list(range(12)), 256)) == 1
    assert len(chunk_hashes(list(range(513)), 256)) == 3
    assert chunk_bounds(513, 256) == [(0, 256), (256, 512), (512, 513)]


def test_hash_chains_over_the_whole_prefix() -> None:
    a = chunk_hashes([1, 2, 3, 4, 5, 6], 2)
    b = chunk_hashes([9, 2, 3, 4, 5, 6], 2)
    assert a[1:] != b[1:]
    assert all(x != y for x, y in zip(a, b, strict=True))


def test_equal_prefixes_share_hashes() -> None:
    a = chunk_hashes(list(range(1000)), 256)
    b = chunk_hashes([*range(768), 5, 6], 256)
    assert a[:3] == b[:3]
    assert a[3] != b[3]


def test_hashes_depend_on_chunk_size() -> None:
    assert chunk_hashes(list(range(8)), 4)[0] != chunk_hashes(list(range(8)), 8)[0]


def test_hashes_are_64_bit() -> None:
    assert all(0 <= h < 2**64 for h in chunk_hashes(list(range(5000)), 256))


@pytest.mark.parametrize("bad", [[1, -1], [1, 2**32], [1, "2"]])
def test_invalid_token_ids_are_rejected(bad: list[object]) -> None:
    with pytest.raises(ValueError, match="token ids must be integers"):
        chunk_hashes(bad, 4)  # type: ignore[arg-type]


def test_identical_across_processes_with_different_hash_seeds() -> None:
    code = (
        "from lmc_connector.tokens import chunk_hashes;print(chunk_hashes(list(range(3000)), 256))"
    )
    outputs = set()
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        outputs.add(result.stdout)
    assert len(outputs) == 1
    assert str(chunk_hashes(list(range(3000)), 256)) == outputs.pop().strip()
