"""msgpack encoding of wire messages and typed decoders that never raise anything else."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import msgspec

T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()


class MessageError(ValueError):
    """Bytes from a peer were not a valid message; drop them and keep serving."""


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


class Decoder(Generic[T]):
    """A reused typed decoder that turns every malformed input into `MessageError`."""

    def __init__(self, kind: Any, name: str) -> None:
        self._decoder: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(kind)
        self._name = name

    def decode(self, data: bytes | memoryview) -> T:
        try:
            return self._decoder.decode(data)
        except msgspec.DecodeError as e:
            raise MessageError(f"malformed {self._name} message ({len(data)} bytes): {e}") from e
