"""LoRA on every Linear of a backbone's blocks (through peft), and the way back to plain weights.

TinyFusion estimates how well a pruned model will recover by letting a low-rank update train
alongside the gates. peft's `inject_adapter_in_model` adds the adapters in place (DiT and
PixArt have no `add_adapter`); only the adapters are left trainable.
"""

from __future__ import annotations

import torch
from torch import nn

from ...models.blocks import block_list_names

ADAPTER = "default"


def lora_targets(backbone: nn.Module) -> list[str]:
    """Full names of every nn.Linear inside the block list, except in the per-block copies of
    model-wide embedders (diffusers DiT's `norm1.emb`: the original DiT's embedders are outside
    the blocks and get no LoRA)."""
    from ...backbones import find_adapter

    adapter = find_adapter(backbone)
    shared = adapter(backbone).block_shared_modules if adapter is not None else ()

    def is_shared(name: str) -> bool:
        inner = name.split(".", 1)[1] if "." in name else ""  # without the block index
        return any(inner == s or inner.startswith(s + ".") for s in shared)

    return [f"{prefix}.{name}" for prefix in block_list_names(backbone)
            for name, module in getattr(backbone, prefix).named_modules()
            if isinstance(module, nn.Linear) and not is_shared(name)]


def add_lora(backbone: nn.Module, rank: int = 8, alpha: float = 16.0) -> int:
    """Freeze the backbone and add LoRA (rank, alpha) to every Linear in its blocks, in place.
    Returns the number of trainable LoRA parameters."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    from peft import LoraConfig, inject_adapter_in_model  # slow to import: only when used

    backbone.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=lora_targets(backbone), bias="none")
    inject_adapter_in_model(config, backbone, adapter_name=ADAPTER)
    return sum(p.numel() for p in backbone.parameters() if p.requires_grad)


def has_lora(backbone: nn.Module) -> bool:
    return any(hasattr(m, "lora_A") for m in backbone.modules())


@torch.no_grad()
def plain_state_dict(backbone: nn.Module, merge: bool) -> dict[str, torch.Tensor]:
    """The backbone's weights under their original names: LoRA layers give their base weight,
    plus the learned low-rank delta when `merge`."""
    state = {}
    deltas = {}
    if merge:
        for name, module in backbone.named_modules():
            if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
                deltas[f"{name}.weight"] = module.get_delta_weight(ADAPTER)
    for key, value in backbone.state_dict().items():
        if ".lora_" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        state[plain] = value + deltas[plain].to(value.dtype) if plain in deltas else value
    return state
