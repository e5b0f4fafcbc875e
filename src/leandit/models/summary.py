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
    if spec.objective == "masked":
        info["mar"] = describe_mar(adapter.model)
    return info


def describe_mar(model: nn.Module) -> dict:
    """A MAR model's parts: encoder/decoder depths and widths, the head's size, parameters
    per part, and the MACs of generating one image (MAR's default loop: 64 iterations, or one
    per token when fewer; the config's head steps; without guidance: with it every part runs
    on both halves, twice these)."""
    from .flops import mar_generation_macs

    c = model.config
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    parameters = {"encoder_blocks": count(model.encoder_blocks), "decoder_blocks": count(model.decoder_blocks),
                  "head": count(model.diffloss)}
    parameters["other"] = count(model) - sum(parameters.values())  # embeddings, norms, position embeddings
    num_iter = min(64, c.num_tokens)
    return {
        "encoder": {"depth": c.encoder_depth, "hidden_size": c.hidden_size, "heads": c.encoder_heads},
        "decoder": {"depth": c.decoder_depth, "hidden_size": c.decoder_hidden_size, "heads": c.decoder_heads},
        "buffer_size": c.buffer_size,
        "head": {"depth": c.head_depth, "width": c.head_width, "timesteps": c.head_timesteps,
                 "sampling_steps": c.head_sampling_steps, "batch_mul": c.head_batch_mul},
        "parameters": parameters,
        "generation": {"num_iter": num_iter, "head_steps": c.head_sampling_steps,
                       "macs_per_image": mar_generation_macs(model, 1, num_iter=num_iter)},
    }
