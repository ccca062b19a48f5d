"""What one cached chunk looks like for one worker."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "uint8": torch.uint8,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True, slots=True)
class ChunkLayout:
    """Shape of a chunk tensor `[planes, layers, tokens, channels]` and whose it is.

    planes is 2 (K then V) or 1 (an MLA latent); channels is kv_heads x head_size
    of this worker's shard. Together with the model and rank it forms the key
    namespace: chunks of another model or rank never match.
    """

    model: str
    world_size: int
    rank: int
    dtype: str
    planes: int
    layers: int
    channels: int
    chunk_size: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def shape(self, num_tokens: int) -> tuple[int, int, int, int]:
        return (self.planes, self.layers, num_tokens, self.channels)

    def fingerprint(self) -> str:
        """A short stable id of this layout, used to separate on-disk namespaces."""
        text = "|".join(
            str(v)
            for v in (
                self.model,
                self.world_size,
                self.rank,
                self.dtype,
                self.planes,
                self.layers,
                self.channels,
                self.chunk_size,
            )
        )
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()

    def instance_fingerprint(self) -> str:
        """A short stable id of what every rank of an instance shares (the layout without the
        rank): instances with equal ids hold interchangeable KV, rank for rank."""
        text = "|".join(
            str(v)
            for v in (
                self.model,
                self.world_size,
                self.dtype,
                self.planes,
                self.layers,
                self.channels,
                self.chunk_size,
            )
        )
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()

    def check(self, kv: torch.Tensor) -> None:
        """Raise if `kv` is not a chunk of this layout."""
        tokens = kv.shape[2] if kv.dim() == 4 else -1
        if kv.dim() != 4 or kv.shape != self.shape(tokens) or not 0 < tokens <= self.chunk_size:
            raise ValueError(
                f"chunk of shape {tuple(kv.shape)} does not fit layout "
                f"{self.shape(self.chunk_size)} (tokens 1..{self.chunk_size})"
            )
        if kv.dtype != self.torch_dtype:
            raise ValueError(f"chunk dtype {kv.dtype} does not match layout dtype {self.dtype}")
