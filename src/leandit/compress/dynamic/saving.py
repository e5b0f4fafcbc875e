"""A DyDiT model in the model folder: the routers' weights and a table of the settings and
the per-timestep widths (which heads and MLP groups each block runs at each trained
timestep), beside the backbone's own files (`leandit.models.wrappers`)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Mapping

import torch
from torch import nn

from ...models.infer import CheckpointError
from .model import DynamicModel, DynamicSettings

TABLE_VERSION = 1


def saved_state(model: DynamicModel) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(the routers' tensors, the JSON table) of a dynamic model."""
    table = {"version": TABLE_VERSION, "settings": asdict(model.settings), "width_table": model.width_table() if model.settings.width else None}
    return dict(model.dynamic_blocks.state_dict()), table


def build_saved(inner: nn.Module, tensors: Mapping[str, torch.Tensor], table: Mapping[str, Any]) -> DynamicModel:
    """The dynamic model of a folder: `inner` (the backbone, already loaded) with its routers."""
    try:
        settings = DynamicSettings(**table["settings"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"the folder's DyDiT table is not one this leandit reads ({err}); re-save the model") from None
    model = DynamicModel(inner, settings)
    expected = model.dynamic_blocks.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tuple(tensors[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        parts = [f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else "",
                 f"mis-shaped {wrong[:3]}" if wrong else ""]
        raise CheckpointError(
            f"the DyDiT router weights do not fit this {model.depth}-block model ({'; '.join(p for p in parts if p)}): "
            "the router file belongs to another model or is damaged"
        )
    if any(not torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point()):
        raise CheckpointError("the DyDiT router weights hold NaN or inf values: the router file is damaged")
    model.dynamic_blocks.load_state_dict(dict(tensors), strict=True)
    return model
