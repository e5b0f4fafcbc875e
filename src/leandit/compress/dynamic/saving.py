"""A DyDiT model in the model folder: the routers' weights and a table of the settings and
the per-timestep widths (which heads and MLP groups each block runs at each trained
timestep), beside the backbone's own files (`leandit.models.wrappers`)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Mapping

import torch
from torch import nn

from ...models.infer import CheckpointError
from ...models.wrappers import check_wrapper_tensors
from .model import DynamicModel, DynamicSettings

TABLE_VERSION = 1


def saved_state(model: DynamicModel) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(the routers' tensors, the JSON table) of a dynamic model."""
    widths = encode_width_table(model.width_table(), model.num_heads) if model.settings.width else None
    table = {"version": TABLE_VERSION, "settings": asdict(model.settings), "width_table": widths}
    return dict(model.dynamic_blocks.state_dict()), table


def encode_width_table(table: Mapping[str, Any], num_heads: int) -> dict[str, Any]:
    """The width table as a person reads it: per block, the runs of timesteps that share a width,
    e.g. "t 0-566: heads 1111, groups 1111" (character k = head / group k runs). Widths change a
    few times over the trajectory, so this is a few lines per block instead of 1000 numbers."""
    timesteps = list(table["timesteps"])
    bits = lambda mask: "".join("1" if (mask >> k) & 1 else "0" for k in range(num_heads))  # noqa: E731
    layers = []
    for heads, groups in zip(table["heads"], table["groups"]):
        runs, start = [], 0
        for i in range(1, len(timesteps) + 1):
            if i == len(timesteps) or (heads[i], groups[i]) != (heads[start], groups[start]):
                runs.append(f"t {timesteps[start]:g}-{timesteps[i - 1]:g}: heads {bits(heads[start])}, groups {bits(groups[start])}")
                start = i
        layers.append(runs)
    return {"timesteps": {"first": timesteps[0], "last": timesteps[-1], "count": len(timesteps)}, "blocks": layers}


def decode_width_table(encoded: Mapping[str, Any]) -> dict[str, Any]:
    """The full table ({"timesteps", "heads", "groups"}: L x T bitmasks) of `encode_width_table`."""
    spec = encoded["timesteps"]
    timesteps = torch.linspace(spec["first"], spec["last"], spec["count"], dtype=torch.float64).tolist()
    if all(float(t).is_integer() for t in (spec["first"], spec["last"])) and spec["last"] - spec["first"] + 1 == spec["count"]:
        timesteps = list(range(int(spec["first"]), int(spec["last"]) + 1))
    mask = lambda text: sum(1 << k for k, c in enumerate(text) if c == "1")  # noqa: E731
    heads, groups = [], []
    for runs in encoded["blocks"]:
        h, g = [], []
        for run in runs:
            span, widths = run.split(": ")
            count = sum(1 for t in timesteps if _in_span(t, span))
            head_bits, group_bits = (part.split()[1] for part in widths.split(", "))
            h += [mask(head_bits)] * count
            g += [mask(group_bits)] * count
        heads.append(h)
        groups.append(g)
    return {"timesteps": timesteps, "heads": heads, "groups": groups}


def _in_span(t: float, span: str) -> bool:
    first, last = (float(v) for v in span.removeprefix("t ").rsplit("-", 1))
    # The text keeps 6 significant digits; grids of 1000 points are 1e-3 apart.
    return first - 1e-6 <= t <= last + 1e-6


def build_saved(inner: nn.Module, tensors: Mapping[str, torch.Tensor], table: Mapping[str, Any]) -> DynamicModel:
    """The dynamic model of a folder: `inner` (the backbone, already loaded) with its routers."""
    try:
        settings = DynamicSettings(**table["settings"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"the folder's DyDiT table is not one this leandit reads ({err}); re-save the model") from None
    model = DynamicModel(inner, settings)
    expected = model.dynamic_blocks.state_dict()
    check_wrapper_tensors(expected, tensors, "DyDiT router", model.depth)
    model.dynamic_blocks.load_state_dict(dict(tensors), strict=True)
    return model
