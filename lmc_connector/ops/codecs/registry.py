"""Codec names -> implementations, imported lazily on first use."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from lmc_connector.ops.codecs import format as fmt
from lmc_connector.ops.codecs.errors import UnknownCodecError


@runtime_checkable
class Codec(Protocol):
    """Encodes one KV chunk [2 or 1, layers, tokens, channels] to self-describing bytes."""

    name: str

    def encode(self, kv: torch.Tensor) -> bytes: ...

    def decode(self, blob: bytes, device: torch.device | str | None = None) -> torch.Tensor: ...

    def encode_batch(self, kvs: Sequence[torch.Tensor]) -> list[bytes]: ...

    def decode_batch(
        self, blobs: Sequence[bytes], device: torch.device | str | None = None
    ) -> list[torch.Tensor]: ...


# name -> (codec id in the byte format, "module:factory"); ids are part of the format, never reuse.
_REGISTRY: dict[str, tuple[int, str]] = {
    "fp8": (1, "lmc_connector.ops.codecs.fp8:Fp8Codec"),
    "cachegen": (2, "lmc_connector.ops.codecs.cachegen:CacheGenCodec"),
}
CODEC_IDS: dict[int, str] = {cid: name for name, (cid, _) in _REGISTRY.items()}


def codec_id(name: str) -> int:
    """The id `name` writes into its blobs' headers."""
    return _REGISTRY[name][0]


def codec_names() -> list[str]:
    return sorted(_REGISTRY)


def get_codec(name: str, **params: Any) -> Codec:
    """A codec by registered name; `params` go to its constructor (e.g. levels for cachegen)."""
    if name not in _REGISTRY:
        names = codec_names()
        hint = difflib.get_close_matches(str(name), names, n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise UnknownCodecError(
            f"unknown compression method {name!r}; registered methods: "
            f"{', '.join(names)}{did_you_mean}"
        )
    module_name, factory = _REGISTRY[name][1].split(":")
    codec: Codec = getattr(importlib.import_module(module_name), factory)(**params)
    return codec


def peek_header(blob: bytes | bytearray | memoryview) -> fmt.BlobHeader:
    """The validated header of `blob` (codec, dtype, shape, section sizes), payload untouched."""
    return fmt.parse(blob, CODEC_IDS)


def decode_blob(blob: bytes, device: torch.device | str | None = None) -> torch.Tensor:
    """Decode a blob of any registered codec, chosen by the codec id in its header."""
    return get_codec(peek_header(blob).codec).decode(blob, device)
