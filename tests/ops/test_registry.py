"""The codec registry: registering codecs, ids that are never reused, calibrated codecs."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
import torch

from lmc_connector.ops.allocator import Allocator
from lmc_connector.ops.codecs import (
    UnknownCodecError,
    codec_names,
    decode_blob,
    get_codec,
    is_calibrated,
    peek_header,
    register,
    unregister,
)
from lmc_connector.ops.codecs import format as fmt

TEST_ID = 201


class EchoCodec:
    """A codec that stores the raw float32 bytes of the chunk (no compression)."""

    name = "echo"

    def encode(self, kv: torch.Tensor) -> bytes:
        return fmt.pack(TEST_ID, kv.dtype, kv.shape, b"", [kv.float().numpy().tobytes()])

    def decode(
        self,
        blob: bytes,
        device: torch.device | str | None = None,
        allocate: Allocator | None = None,
    ) -> torch.Tensor:
        header = peek_header(blob)
        (payload,) = header.sections(blob)
        kv = torch.frombuffer(bytearray(payload), dtype=torch.float32).view(header.shape)
        out = allocate(header.shape, header.dtype) if allocate is not None else None
        return kv.to(header.dtype) if out is None else out.copy_(kv)

    def encode_batch(self, kvs: Sequence[torch.Tensor]) -> list[bytes]:
        return [self.encode(kv) for kv in kvs]

    def decode_batch(
        self,
        blobs: Sequence[bytes],
        device: torch.device | str | None = None,
        allocate: Allocator | None = None,
    ) -> list[torch.Tensor]:
        return [self.decode(b, device, allocate) for b in blobs]


@pytest.fixture
def echo() -> Iterator[str]:
    register("echo", TEST_ID, "tests.ops.test_registry:EchoCodec")
    yield "echo"
    unregister("echo")


def test_a_registered_codec_encodes_decodes_and_is_listed(echo: str) -> None:
    kv = torch.randn(2, 2, 3, 4).half()
    blob = get_codec(echo).encode(kv)
    assert echo in codec_names() and not is_calibrated(echo)
    assert peek_header(blob).codec == echo
    assert torch.equal(decode_blob(blob), kv)


def test_an_unregistered_codec_is_unknown_and_its_blobs_no_longer_decode() -> None:
    register("echo", TEST_ID, "tests.ops.test_registry:EchoCodec")
    blob = get_codec("echo").encode(torch.ones(1, 1, 1, 2))
    unregister("echo")
    assert "echo" not in codec_names()
    with pytest.raises(UnknownCodecError, match="echo"):
        get_codec("echo")
    with pytest.raises(ValueError, match="unknown codec id"):
        decode_blob(blob)


def test_a_taken_name_is_refused(echo: str) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register(echo, TEST_ID + 1, "tests.ops.test_registry:EchoCodec")
    with pytest.raises(ValueError, match="already registered"):
        register("cachegen", 250, "tests.ops.test_registry:EchoCodec")


def test_a_taken_or_retired_id_is_refused_with_the_reason(echo: str) -> None:
    with pytest.raises(ValueError, match=r"taken by 'cachegen'.*never reused"):
        register("other", 2, "tests.ops.test_registry:EchoCodec")
    unregister(echo)
    try:
        with pytest.raises(ValueError, match="taken by 'echo'"):
            register("other", TEST_ID, "tests.ops.test_registry:EchoCodec")
    finally:
        register(echo, TEST_ID, "tests.ops.test_registry:EchoCodec")


@pytest.mark.parametrize(
    ("name", "cid", "target", "match"),
    [
        ("Bad Name", 210, "a.b:C", "lower-case"),
        ("fine", 0, "a.b:C", "integer in"),
        ("fine", 256, "a.b:C", "integer in"),
        ("fine", "7", "a.b:C", "integer in"),
        ("fine", 210, "a.b.C", "module:attribute"),
    ],
)
def test_bad_registrations_say_what_to_fix(name: str, cid: object, target: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        register(name, cid, target)  # type: ignore[arg-type]
    assert "fine" not in codec_names()


def test_unregistering_an_unknown_codec_is_an_error() -> None:
    with pytest.raises(UnknownCodecError):
        unregister("nope")


def test_kvtc_is_the_calibrated_codec() -> None:
    assert [n for n in codec_names() if is_calibrated(n)] == ["kvtc"]
