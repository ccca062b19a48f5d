"""Constrained field types of the wire messages: malformed values fail at decoding.

The caps keep a forged message from making a receiver loop over billions of
ranks or allocate for absurd sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import msgspec

from lmc_connector.tokens import MAX_TOKEN_ID, ChunkKey, KeyScope, Prompt

TokenId = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKEN_ID)]
#: Most token ids one message may carry (16M); the controller's `--max-tokens` stays below.
MAX_WIRE_TOKENS = 1 << 24
TokenList = Annotated[list[TokenId], msgspec.Meta(max_length=MAX_WIRE_TOKENS)]
#: A chained 64-bit chunk hash (msgspec decodes up to 2**64 - 1).
WireChunkKey = Annotated[ChunkKey, msgspec.Meta(ge=0)]
MAX_WORLD_SIZE = 256
Rank = Annotated[int, msgspec.Meta(ge=0, le=MAX_WORLD_SIZE - 1)]
WorldSize = Annotated[int, msgspec.Meta(ge=1, le=MAX_WORLD_SIZE)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
#: Where the controller connects back to a worker: an IPv4 address or a DNS name. Anything
#: else (spaces, "*", URLs) is rejected at decoding, so it never reaches a socket.
Host = Annotated[
    str,
    msgspec.Meta(
        max_length=253,
        pattern=r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*$",
    ),
]
#: Instance ids name a vLLM deployment; long ids are a mistake or an attack (they are echoed).
MAX_INSTANCE_ID_LENGTH = 256
InstanceId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_INSTANCE_ID_LENGTH)]
#: Location and method names (`LocalCPUBackend`, `cachegen`, ...).
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
#: A worker's peer server as a ZMQ address (`tcp://host:port`), as the controller hands it out.
PeerAddress = Annotated[
    str, msgspec.Meta(max_length=300, pattern=r"^tcp://[A-Za-z0-9_.-]{1,253}:[0-9]{1,5}$")
]
#: A calibration's content hash (`ops.codecs.calibration_id`): 32 hex digits.
CalibrationId = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{32}$")]


#: A salt or an adapter name/path: long enough for any real one, short enough to echo.
ScopeText = Annotated[str, msgspec.Meta(max_length=4096)]


class PromptScope(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """What besides token ids names a prompt's cached KV (see `tokens.KeyScope`).

    `cache_salt` is the salt the prompt was sent to vLLM with; `lora_name` and
    `lora_path` name the LoRA adapter it was served with (as in `--lora-modules
    name=path`). A prompt cached under a salt or an adapter is found only with it.
    """

    cache_salt: ScopeText | None = None
    lora_name: ScopeText | None = None
    lora_path: ScopeText | None = None

    def key_scope(self) -> KeyScope:
        return KeyScope(self.cache_salt, self.lora_name, self.lora_path)


def key_scope(scope: PromptScope | None) -> KeyScope | None:
    """The hashing scope of an optional wire scope."""
    return None if scope is None else scope.key_scope()


def prompt_of(tokens: Sequence[int], scope: PromptScope | None) -> Prompt:
    """Token ids as the prompt they name: keyed under `scope` by the cache engine."""
    return Prompt(tokens, key_scope(scope))
