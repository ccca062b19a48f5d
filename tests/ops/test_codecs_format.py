"""The shared byte format: every malformed blob is a CodecError, found before allocation."""

from __future__ import annotations

import struct
import tracemalloc

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmc_connector.ops.codecs import CodecError, decode_blob, get_codec, peek_header
from lmc_connector.ops.codecs.format import reseal

NAMES = ["cachegen", "fp8"]


def blob_of(name: str, shape: tuple[int, ...] = (2, 2, 6, 8)) -> bytes:
    kv = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).half()
    return get_codec(name).encode(kv)


VALID = {name: blob_of(name) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_truncated_blob_is_a_codec_error(name: str) -> None:
    blob = VALID[name]
    for cut in (0, 3, 20, len(blob) // 2, len(blob) - 1):
        with pytest.raises(CodecError):
            decode_blob(blob[:cut])


@pytest.mark.parametrize("name", NAMES)
def test_every_single_bit_flip_is_a_codec_error(name: str) -> None:
    blob = bytearray(VALID[name])
    for pos in range(len(blob)):
        blob[pos] ^= 1 << (pos % 8)
        with pytest.raises(CodecError):
            decode_blob(bytes(blob))
        blob[pos] ^= 1 << (pos % 8)


@pytest.mark.parametrize("name", NAMES)
def test_checksum_mismatch_is_reported(name: str) -> None:
    blob = bytearray(VALID[name])
    blob[-12] ^= 0xFF
    with pytest.raises(CodecError, match="checksum"):
        decode_blob(bytes(blob))


@pytest.mark.parametrize("name", NAMES)
def test_padded_blob_is_a_codec_error(name: str) -> None:
    with pytest.raises(CodecError, match="truncated or padded"):
        decode_blob(reseal(VALID[name][:-4] + b"\0\0" + VALID[name][-4:]))


def test_bad_magic_and_version_are_named() -> None:
    blob = VALID["fp8"]
    with pytest.raises(CodecError, match="magic"):
        decode_blob(reseal(b"XXXX" + blob[4:]))
    with pytest.raises(CodecError, match="version"):
        decode_blob(reseal(blob[:4] + b"\x09" + blob[5:]))


def test_not_bytes_is_a_codec_error() -> None:
    with pytest.raises(CodecError, match="bytes"):
        decode_blob("LMCK")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", NAMES)
def test_header_claiming_a_huge_shape_is_rejected_before_allocation(name: str) -> None:
    blob = VALID[name]
    huge = struct.pack("<4I", 2, 4096, 65536, 4096)
    tracemalloc.start()
    try:
        with pytest.raises(CodecError):
            decode_blob(reseal(blob[:12] + huge + blob[28:]))
        big = struct.pack("<4I", 2, 2, 6 * 10_000, 8)
        with pytest.raises(CodecError):
            decode_blob(reseal(blob[:12] + big + blob[28:]))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize("name", NAMES)
def test_section_of_the_wrong_size_is_a_codec_error(name: str) -> None:
    header = peek_header(VALID[name])
    blob = VALID[name]
    at = header.payload_offset - 4 * len(header.section_sizes)
    sizes = list(header.section_sizes)
    sizes[0] -= 1
    sizes[-1] += 1
    forged = blob[:at] + struct.pack(f"<{len(sizes)}I", *sizes) + blob[at + 4 * len(sizes) :]
    with pytest.raises(CodecError, match="sections"):
        decode_blob(reseal(forged))


def test_cachegen_corrupt_payload_with_valid_checksum_is_a_codec_error() -> None:
    blob = bytearray(VALID["cachegen"])
    header = peek_header(bytes(blob))
    words_at = header.payload_offset + sum(header.section_sizes[:3])
    blob[words_at] ^= 0x5A
    with pytest.raises(CodecError, match="corrupt"):
        decode_blob(reseal(bytes(blob)))


def _decode_or_codec_error(blob: bytes) -> None:
    try:
        out = decode_blob(blob)
    except CodecError:
        return
    header = peek_header(blob)
    assert out.shape == header.shape and out.dtype == header.dtype
    assert out.numel() <= 1500 * len(blob)


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.binary(max_size=200) | st.builds(lambda tail: b"LMCK\x01" + tail, st.binary(max_size=300))
)
def test_fuzz_random_bytes_never_crash(blob: bytes) -> None:
    _decode_or_codec_error(blob)
    _decode_or_codec_error(reseal(blob) if len(blob) >= 4 else blob)


@settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(NAMES),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
    st.integers(0, 3),
)
def test_fuzz_mutated_blobs_never_crash(name: str, edits: list[tuple[int, int]], mode: int) -> None:
    blob = bytearray(VALID[name])
    for pos, value in edits:
        if mode == 3 and len(blob) > 8:
            del blob[pos % len(blob)]
        else:
            blob[pos % len(blob)] = value
    data = bytes(blob)
    _decode_or_codec_error(data)
    _decode_or_codec_error(reseal(data))
