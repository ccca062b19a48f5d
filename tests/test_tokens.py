import os
import subprocess
import sys

import pytest

from lmc_connector.tokens import KeyScope, Prompt, chunk_bounds, chunk_hashes, scope_of


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
        "from lmc_connector.tokens import KeyScope, chunk_hashes;"
        "print(chunk_hashes(list(range(3000)), 256), "
        "chunk_hashes([1, 2], 256, KeyScope('salt', 'lora', '/p', (('img', 0, 2),))))"
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
    scoped = chunk_hashes([1, 2], 256, KeyScope("salt", "lora", "/p", (("img", 0, 2),)))
    assert f"{chunk_hashes(list(range(3000)), 256)} {scoped}" == outputs.pop().strip()


PROMPT = list(range(40))
SCOPES = [
    KeyScope(cache_salt="tenant-a"),
    KeyScope(cache_salt="tenant-b"),
    KeyScope(lora_name="sql", lora_path="/adapters/sql"),
    KeyScope(lora_name="sql", lora_path="/adapters/sql-v2"),
    KeyScope(lora_name="chat", lora_path="/adapters/sql"),
    KeyScope(multimodal=(("image-1", 3, 10),)),
    KeyScope(multimodal=(("image-2", 3, 10),)),
    KeyScope(multimodal=(("image-1", 4, 10),)),
    KeyScope(cache_salt="tenant-a", lora_name="sql", lora_path="/adapters/sql"),
]


def test_an_empty_scope_keeps_the_plain_token_chain() -> None:
    """Caches written before scopes existed, and prompts with nothing but tokens, still hit."""
    assert chunk_hashes(PROMPT, 16, KeyScope()) == chunk_hashes(PROMPT, 16)
    assert chunk_hashes(PROMPT, 16, KeyScope(cache_salt="")) == chunk_hashes(PROMPT, 16)


def test_every_salt_adapter_and_image_gets_keys_of_its_own() -> None:
    """Same tokens under another salt, adapter or image never share a single chunk."""
    chains = [chunk_hashes(PROMPT, 16)] + [chunk_hashes(PROMPT, 16, s) for s in SCOPES]
    keys = [k for chain in chains for k in chain]
    assert len(set(keys)) == len(keys)


def test_a_scope_hashes_the_same_every_time() -> None:
    again = [KeyScope(s.cache_salt, s.lora_name, s.lora_path, s.multimodal) for s in SCOPES]
    assert [chunk_hashes(PROMPT, 16, s) for s in again] == [
        chunk_hashes(PROMPT, 16, s) for s in SCOPES
    ]


def test_a_prompt_is_its_token_ids_carrying_its_scope() -> None:
    scope = KeyScope(cache_salt="tenant-a")
    prompt = Prompt(PROMPT, scope)
    assert prompt == PROMPT and len(prompt) == len(PROMPT)
    assert scope_of(prompt) is scope and scope_of(PROMPT) is None
