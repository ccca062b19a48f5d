"""What one cached chunk looks like for one worker."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

#: Element types a chunk tensor may have: floats a codec can code, and bytes (every other KV
#: cache type travels as its raw bytes, see `ops.paged.storage_dtype`).
DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "uint8": torch.uint8,
}
#: KV cache types whose chunks hold the numbers themselves (vLLM's `--kv-cache-dtype` values).
CODABLE_CACHE_DTYPES = frozenset({"auto", "float16", "bfloat16", "float32", "half", "float"})


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True, slots=True)
class ChunkLayout:
    """Shape of a chunk tensor `[planes, layers, tokens, channels]` and whose it is.

    planes is 2 (K then V) or 1 (an MLA latent, or an opaque quantized page);
    channels is kv_heads x head_size of this worker's shard (bytes for an opaque
    page). Every field is part of the key namespace (`fingerprint`): chunks of
    another model, rank, KV cache type (e4m3 and e5m2 are both bytes) or
    attention backend (each lays K and V out its own way) never match.
    """

    model: str
    world_size: int
    rank: int
    dtype: str
    planes: int
    layers: int
    channels: int
    chunk_size: int
    #: vLLM's KV cache type (`--kv-cache-dtype`: "auto", "fp8_e4m3", "int8_per_token_head"...).
    cache_dtype: str = "auto"
    #: The attention backend that wrote the pages ("FLASH_ATTN", "CPU_ATTN", ...).
    backend: str = ""
    #: What else tells the model's weights apart under one name: its revision and
    #: quantization ("revision=abc123|quantization=awq"); empty when neither is set.
    variant: str = ""

    @property
    def codable(self) -> bool:
        """Whether codecs can compress these chunks (numbers, not quantized bytes)."""
        return self.dtype in ("float16", "bfloat16", "float32") and (
            self.cache_dtype in CODABLE_CACHE_DTYPES
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def shape(self, num_tokens: int) -> tuple[int, int, int, int]:
        return (self.planes, self.layers, num_tokens, self.channels)

    def nbytes(self, num_tokens: int) -> int:
        """Bytes of a plain chunk of `num_tokens` tokens."""
        return self.planes * self.layers * num_tokens * self.channels * self.torch_dtype.itemsize

    def fingerprint(self) -> str:
        """A short stable id of this layout, used to separate on-disk namespaces."""
        return self._digest(with_rank=True)

    def instance_fingerprint(self) -> str:
        """A short stable id of what every rank of an instance shares (the layout without the
        rank): instances with equal ids hold interchangeable KV, rank for rank."""
        return self._digest(with_rank=False)

    def _digest(self, with_rank: bool) -> str:
        rank = (self.rank,) if with_rank else ()
        fields = (
            self.model,
            self.world_size,
            *rank,
            self.dtype,
            self.planes,
            self.layers,
            self.channels,
            self.chunk_size,
            self.cache_dtype,
            self.backend,
            *((self.variant,) if self.variant else ()),  # unset: the fingerprints of before
        )
        return hashlib.blake2b("|".join(map(str, fields)).encode(), digest_size=8).hexdigest()

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
