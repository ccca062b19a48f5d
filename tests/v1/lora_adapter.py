"""A LoRA adapter for the tiny test model, written in the PEFT layout vLLM loads.

No training and no `peft` package: random low-rank A and B matrices on the
attention projections, saved with `safetensors` beside an `adapter_config.json`.
B is not zero, so the adapter really changes queries and values: a prompt's KV
under the adapter differs from its KV under the base model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

RANK = 8


def write_lora_adapter(model_dir: Path, out: Path, seed: int = 7) -> Path:
    """Write an adapter for the model in `model_dir` into `out`; returns `out`."""
    config = json.loads((model_dir / "config.json").read_text())
    hidden = config["hidden_size"]
    head = config.get("head_dim") or hidden // config["num_attention_heads"]
    outputs = {
        "q_proj": config["num_attention_heads"] * head,
        "v_proj": config["num_key_value_heads"] * head,
    }
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(config["num_hidden_layers"]):
        for name, width in outputs.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, hidden, generator=gen) * 0.1
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(width, RANK, generator=gen) * 0.1
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "base_model_name_or_path": str(model_dir),
        "r": RANK,
        "lora_alpha": 2 * RANK,
        "lora_dropout": 0.0,
        "target_modules": sorted(outputs),
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "fan_in_fan_out": False,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return out
