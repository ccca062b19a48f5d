"""Malformed calibrations and kvtc blobs are CodecErrors, found before allocating anything big."""

from __future__ import annotations

import contextlib
import struct
import tracemalloc
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmc_connector.ops.codecs import (
    CalibrationStore,
    CodecError,
    calibration_id,
    decode_blob,
    fit_calibration,
    get_codec,
    parse_calibration,
    peek_header,
)
from lmc_connector.ops.codecs.calibration import _CRC, _HEAD
from lmc_connector.ops.codecs.format import reseal
from tests.ops.kv_builders import attention_like

SHAPE = (2, 2, 24, 4)
CALIBRATION = fit_calibration("kvtc", attention_like(SHAPE, 3, seed=0))
STORE = CalibrationStore()
STORE.add(CALIBRATION)
BLOB = get_codec("kvtc", calibration=CALIBRATION, quality=5.0).encode(
    attention_like(SHAPE, 1, seed=1)[0]
)


def reseal_calibration(blob: bytes) -> bytes:
    body = blob[: -_CRC.size]
    return body + _CRC.pack(zlib.crc32(body))


def decode_or_codec_error(blob: bytes) -> None:
    try:
        out = decode_blob(blob, calibrations=STORE)
    except CodecError:
        return
    header = peek_header(blob)
    assert out.shape == header.shape and out.dtype == header.dtype


# -- calibrations ------------------------------------------------------------------------------


def test_calibration_round_trips_through_its_bytes() -> None:
    cal = parse_calibration(CALIBRATION)
    assert cal.blob == CALIBRATION and cal.id == calibration_id(CALIBRATION)
    assert cal.layout == (2, 2, 4) and len(cal.ranks) == 2


@pytest.mark.parametrize("cut", [0, 5, _HEAD.size, len(CALIBRATION) // 2, len(CALIBRATION) - 1])
def test_truncated_calibration_is_refused(cut: int) -> None:
    with pytest.raises(CodecError):
        parse_calibration(CALIBRATION[:cut])
    with pytest.raises(CodecError):
        calibration_id(CALIBRATION[:cut])


def test_every_single_bit_flip_in_a_calibration_is_refused() -> None:
    blob = bytearray(CALIBRATION)
    for pos in range(len(blob)):
        blob[pos] ^= 1 << (pos % 8)
        with pytest.raises(CodecError):
            parse_calibration(bytes(blob))
        blob[pos] ^= 1 << (pos % 8)


def test_calibration_bad_magic_version_and_padding_are_named() -> None:
    with pytest.raises(CodecError, match="magic"):
        parse_calibration(reseal_calibration(b"XXXX" + CALIBRATION[4:]))
    with pytest.raises(CodecError, match="version"):
        parse_calibration(reseal_calibration(CALIBRATION[:4] + b"\x09" + CALIBRATION[5:]))
    with pytest.raises(CodecError, match="describes"):
        parse_calibration(reseal_calibration(CALIBRATION[:-4] + b"\0\0" + CALIBRATION[-4:]))
    with pytest.raises(CodecError, match="bytes"):
        parse_calibration("LMCC")  # type: ignore[arg-type]


def test_calibration_values_are_checked_past_the_checksum() -> None:
    cal = parse_calibration(CALIBRATION)
    dims = cal.planes * cal.channels
    scale_at = _HEAD.size + 2 * cal.layers
    negative = CALIBRATION[:scale_at] + struct.pack("<f", -1.0) + CALIBRATION[scale_at + 4 :]
    with pytest.raises(CodecError, match="scale"):
        parse_calibration(reseal_calibration(negative))
    nan = CALIBRATION[:scale_at] + struct.pack("<f", float("nan")) + CALIBRATION[scale_at + 4 :]
    with pytest.raises(CodecError, match="non-finite"):
        parse_calibration(reseal_calibration(nan))
    basis_at = len(CALIBRATION) - _CRC.size - 2 * sum(cal.ranks) * dims
    doubled = CALIBRATION[:basis_at] + b"\x00\x40" + CALIBRATION[basis_at + 2 :]  # 2.0 in fp16
    with pytest.raises(CodecError, match="unit"):
        parse_calibration(reseal_calibration(doubled))


def test_calibration_claiming_a_huge_layout_is_refused_before_allocation() -> None:
    head = _HEAD.pack(b"LMCC", 1, 3, 2, 1024, 16384, 1)
    tracemalloc.start()
    try:
        with pytest.raises(CodecError):
            parse_calibration(reseal_calibration(head + b"\xff\x7f" * 1024 + b"\0" * 64))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200) | st.builds(lambda t: b"LMCC\x01" + t, st.binary(max_size=300)))
def test_fuzz_random_calibrations_never_crash(blob: bytes) -> None:
    for candidate in (blob, reseal_calibration(blob) if len(blob) >= 4 else blob):
        with contextlib.suppress(CodecError):
            parse_calibration(candidate)


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 100_000), st.integers(0, 255)), min_size=1, max_size=4))
def test_fuzz_mutated_calibrations_are_refused_or_valid(edits: list[tuple[int, int]]) -> None:
    blob = bytearray(CALIBRATION)
    for pos, value in edits:
        blob[pos % len(blob)] = value
    try:
        cal = parse_calibration(reseal_calibration(bytes(blob)))
    except CodecError:
        return
    assert all(bool(torch.isfinite(b).all()) for b in cal.basis)


# -- kvtc blobs --------------------------------------------------------------------------------


def test_every_single_bit_flip_in_a_blob_is_a_codec_error() -> None:
    blob = bytearray(BLOB)
    for pos in range(len(blob)):
        blob[pos] ^= 1 << (pos % 8)
        with pytest.raises(CodecError):
            decode_blob(bytes(blob), calibrations=STORE)
        blob[pos] ^= 1 << (pos % 8)


def test_blob_naming_another_calibration_past_the_checksum_is_a_miss() -> None:
    header = peek_header(BLOB)
    at = header.payload_offset - 4 * len(header.section_sizes) - len(header.params)
    forged = BLOB[:at] + bytes(16) + BLOB[at + 16 :]
    with pytest.raises(CodecError, match="calibration"):
        decode_blob(reseal(forged), calibrations=STORE)


def test_blob_with_corrupt_words_past_the_checksum_is_a_codec_error() -> None:
    blob = bytearray(BLOB)
    header = peek_header(BLOB)
    words_at = header.payload_offset + sum(header.section_sizes[:5])
    blob[words_at] ^= 0x5A
    with pytest.raises(CodecError, match="corrupt"):
        decode_blob(reseal(bytes(blob)), calibrations=STORE)


def test_header_claiming_a_huge_shape_is_rejected_before_allocation() -> None:
    tracemalloc.start()
    try:
        for dims in [(2, 2, 65535, 4), (2, 2, 24 * 1000, 4)]:
            with pytest.raises(CodecError):
                decode_blob(reseal(BLOB[:12] + struct.pack("<4I", *dims) + BLOB[28:]),
                            calibrations=STORE)  # fmt: skip
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


@settings(max_examples=200, deadline=3000, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
    st.integers(0, 3),
)
def test_fuzz_mutated_blobs_never_crash(edits: list[tuple[int, int]], mode: int) -> None:
    blob = bytearray(BLOB)
    for pos, value in edits:
        if mode == 3 and len(blob) > 8:
            del blob[pos % len(blob)]
        else:
            blob[pos % len(blob)] = value
    decode_or_codec_error(bytes(blob))
    decode_or_codec_error(reseal(bytes(blob)))
