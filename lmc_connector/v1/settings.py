"""What the connector takes from vLLM's configuration, checked once at start-up.

With `connector.py`, the only module that reads `VllmConfig` (and the KV
cache config). Configurations whose KV this cache would get wrong are refused
here, before anything is served, with the setting to change:

* context parallelism (decode or prefill context parallel size > 1): a
  token's KV lives on one rank of the group only, and prefill-context ranks
  would share one rank number, so one socket path and one key namespace;
* more than one KV cache group (vLLM's hybrid KV cache manager: sliding
  window beside full attention, Mamba, ...): chunks are built from one block
  table, so every layer must use the same blocks;
* layers whose blocks vLLM frees while the request runs (sliding window,
  chunked local attention) or whose pages do not hold one state per token.

vLLM 0.32 / 0.33 differences handled here: the context-parallel sizes and the
KV cache spec classes are read by name with defaults, so either release (and
configs built without a KV cache config) passes through the same checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmc_connector.ops.paged import KVFormat

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

#: KV cache spec classes whose blocks hold every token's KV for the request's lifetime.
FULL_ATTENTION_SPECS = frozenset({"FullAttentionSpec", "MLAAttentionSpec"})
#: vLLM quantization modes whose pages are plain K|V halves per token (fp8 is bytes, but laid
#: out like the unquantized cache; per-token-head modes append a scale to each half).
_HALVES_QUANT_MODES = frozenset(
    {"NONE", "FP8_PER_TENSOR", "INT8_PER_TOKEN_HEAD", "FP8_PER_TOKEN_HEAD", "INT4_PER_TOKEN_HEAD"}
)


class UnsupportedConfiguration(ValueError):
    """vLLM is configured in a way this connector would serve wrong KV for; the message names
    the setting to change."""


@dataclass(frozen=True, slots=True)
class KVCacheFacts:
    """What the connector relies on about vLLM's KV cache, read from its KV cache spec."""

    #: Tokens per scheduler block (the unit of the block ids in the metadata).
    block_size: int
    #: vLLM's `--kv-cache-dtype` for these layers ("auto", "fp8_e4m3", ...).
    cache_dtype: str
    #: The spec's quantization mode name ("NONE", "FP8_PER_TENSOR", "NVFP4", ...).
    quant_mode: str


def _specs(spec: Any) -> list[Any]:
    """The per-layer specs of a group's spec (vLLM wraps uniform ones in one object)."""
    inner = getattr(spec, "kv_cache_specs", None)
    return list(inner.values()) if isinstance(inner, dict) else [spec]


def _check_parallelism(vllm_config: VllmConfig) -> None:
    parallel = vllm_config.parallel_config
    for name, flag in (
        ("decode_context_parallel_size", "--decode-context-parallel-size"),
        ("prefill_context_parallel_size", "--prefill-context-parallel-size"),
    ):
        size = int(getattr(parallel, name, 1) or 1)
        if size > 1:
            raise UnsupportedConfiguration(
                f"lmc_connector does not support context parallelism: {name}={size}. Each "
                "rank of a context-parallel group holds only some tokens' KV, which this "
                f"cache's chunks do not describe; run with {flag} 1 (or without the connector)"
            )


def _check_groups(kv_cache_config: KVCacheConfig) -> Any:
    groups = list(kv_cache_config.kv_cache_groups)
    if len(groups) != 1:
        kinds = sorted({type(s).__name__ for g in groups for s in _specs(g.kv_cache_spec)})
        raise UnsupportedConfiguration(
            f"lmc_connector caches one KV cache group, but vLLM built {len(groups)} "
            f"({', '.join(kinds) or 'none'}): its hybrid KV cache manager is on, or the model "
            "mixes layer kinds. Run with --disable-hybrid-kv-cache-manager (a model whose "
            "layers cannot share one block table, such as a Mamba hybrid, cannot use this "
            "connector)"
        )
    layer_specs = _specs(groups[0].kv_cache_spec)
    for layer_spec in layer_specs:
        kind = type(layer_spec).__name__
        if kind not in FULL_ATTENTION_SPECS:
            raise UnsupportedConfiguration(
                f"lmc_connector caches full-attention KV only; this model's layers are "
                f"{kind}: vLLM frees their blocks while a request runs, so cached chunks "
                "would be incomplete. For sliding-window models run with "
                "--disable-sliding-window (full attention up to the window)"
            )
        if getattr(layer_spec, "tokens_per_state", 1) != 1:
            raise UnsupportedConfiguration(
                f"lmc_connector needs one KV state per token; this model's {kind} pages hold "
                f"one per {layer_spec.tokens_per_state} tokens"
            )
    return layer_specs[0]


def check_supported(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None) -> KVCacheFacts:
    """Refuse what this connector would get wrong; the facts about the KV cache otherwise."""
    _check_parallelism(vllm_config)
    cache_dtype = str(getattr(vllm_config.cache_config, "cache_dtype", "auto"))
    if kv_cache_config is None or not kv_cache_config.kv_cache_groups:
        return KVCacheFacts(vllm_config.cache_config.block_size, cache_dtype, "NONE")
    spec = _check_groups(kv_cache_config)
    cache_dtype = str(getattr(spec, "cache_dtype_str", None) or cache_dtype)
    mode = getattr(spec, "kv_quant_mode", None)
    return KVCacheFacts(int(spec.block_size), cache_dtype, getattr(mode, "name", "NONE"))


def world_size(vllm_config: VllmConfig) -> int:
    parallel = vllm_config.parallel_config
    return int(parallel.tensor_parallel_size * parallel.pipeline_parallel_size)


def data_parallel_rank(vllm_config: VllmConfig) -> int:
    return int(getattr(vllm_config.parallel_config, "data_parallel_rank", 0) or 0)


def engine_id(vllm_config: VllmConfig) -> str:
    assert vllm_config.kv_transfer_config is not None
    return str(vllm_config.kv_transfer_config.engine_id)


def attention_backend(vllm_config: VllmConfig, layer_name: str) -> str:
    """The name of the attention backend a layer runs on ("" when vLLM does not say)."""
    layer = vllm_config.compilation_config.static_forward_context.get(layer_name)
    backend = getattr(layer, "attn_backend", None)
    return str(backend.get_name()) if backend is not None else ""


def layer_format(vllm_config: VllmConfig, backend: str, facts: KVCacheFacts) -> KVFormat:
    """How this backend lays K and V out in the views vLLM registers."""
    if vllm_config.model_config.use_mla:
        return KVFormat.MLA
    if backend.startswith("CPU"):
        return KVFormat.CPU_PAGED
    if facts.quant_mode not in _HALVES_QUANT_MODES:
        return KVFormat.OPAQUE
    return KVFormat.PACKED
