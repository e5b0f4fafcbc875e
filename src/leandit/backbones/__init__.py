"""Backbone adapters: one per architecture, found from the model by a table lookup.

    from leandit.backbones import backbone
    bb = backbone(model)                 # DiT, SiT, diffusers DiT, PixArt ...
    bb.spec.objective, bb.spec.conditioning, bb.spec.input_shape
    out = bb.predict(x_t, t, cond)       # (N, C_out, H, W) whatever the model returns

To add an architecture: write a `Backbone` subclass (or, for a diffusers transformer of a
known shape, a row in `diffusers.LAYOUTS`) and put it in `ADAPTERS`. See the README section
"Adding an architecture".
"""

from __future__ import annotations

from torch import nn

from .base import OBJECTIVES, SPACES, Backbone, BackboneSpec
from .conditioning import (
    ClassLabels,
    Cond,
    Conditioning,
    TextEmbeddings,
    cond_batch_size,
    cond_cat,
    cond_map,
    cond_repeat,
    cond_slice,
    cond_to,
    cond_where,
)
from .diffusers import LAYOUTS, DiffusersBackbone, leandit_info
from .dit import DiTBackbone
from .mar import MARBackbone

# Consulted in order; the folder's model_type names the adapter that reads it.
ADAPTERS: tuple[type[Backbone], ...] = (DiTBackbone, DiffusersBackbone, MARBackbone)
ADAPTERS_BY_TYPE: dict[str, type[Backbone]] = {a.model_type: a for a in ADAPTERS}


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(module, "module") and type(module).__name__ == "DistributedDataParallel":
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


def _peel(model: nn.Module) -> nn.Module:
    """The backbone inside registered compression wrappers (`leandit.models.wrappers`)."""
    from ..models.wrappers import peel_wrappers

    return peel_wrappers(model)[0]


def find_adapter(model: nn.Module) -> type[Backbone] | None:
    model = _peel(unwrap(model))
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    return None


def is_backbone(model: nn.Module) -> bool:
    return find_adapter(model) is not None


def backbone(model: nn.Module) -> Backbone:
    """The adapter of `model` (unwrapped from DDP / compile); a clear error for others.

    A backbone inside registered compression wrappers (a DyDiT model) is adapted as the
    backbone it holds, and its calls go through the outermost wrapper."""
    outer = unwrap(model)
    inner = _peel(outer)
    adapter = find_adapter(inner)
    if adapter is None:
        known = ["leandit DiT/SiT", "leandit MAR", *(f"diffusers {name}" for name in LAYOUTS)]
        raise ValueError(f"{type(inner).__name__} is not a backbone leandit can adapt; supported: {', '.join(known)}")
    return adapter(inner, outer)


__all__ = [
    "ADAPTERS",
    "ADAPTERS_BY_TYPE",
    "LAYOUTS",
    "OBJECTIVES",
    "SPACES",
    "Backbone",
    "BackboneSpec",
    "ClassLabels",
    "Cond",
    "Conditioning",
    "DiTBackbone",
    "DiffusersBackbone",
    "MARBackbone",
    "TextEmbeddings",
    "backbone",
    "cond_batch_size",
    "cond_cat",
    "cond_map",
    "cond_repeat",
    "cond_slice",
    "cond_to",
    "cond_where",
    "find_adapter",
    "is_backbone",
    "leandit_info",
    "unwrap",
]
