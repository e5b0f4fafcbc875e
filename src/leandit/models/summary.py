"""What a model is, as one dict: architecture, parameters, FLOPs, compression history (what
`leandit info --json` prints and the demo's report reads)."""

from __future__ import annotations

from torch import nn

from ..backbones import backbone
from .flops import count_parameters, forward_flops


def describe(model: nn.Module, batch_size: int = 1) -> dict:
    adapter = backbone(model)
    spec = adapter.spec
    outer = adapter.outer
    dynamic = outer.summary() if hasattr(outer, "summary") and getattr(outer, "varies_with_timestep", False) else None
    flops = forward_flops(adapter.model, batch_size)  # a dynamic model's dense backbone: its upper bound
    info = {
        "source": getattr(model, "source", None) or spec.name,
        "family": spec.family,
        "architecture": adapter.describe(),
        "backbone": spec.to_dict(),
        "tokens": spec.num_tokens,
        "parameters": count_parameters(model),
        "fixed_position_embedding": sum(b.numel() for b in model.buffers()),
        "batch_size": batch_size,
        "flops_per_forward": flops,
        "macs_per_forward": flops // 2,
        "compression": getattr(model, "compression", None) or [],
    }
    if dynamic is not None:
        info["dynamic"] = dynamic
    return info
