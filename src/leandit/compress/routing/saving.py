"""A routed model in the model folder: the routers' weights and the learned ratios beside the
backbone's files, and a table of the settings and the static schedule (layer x timestep
region -> capacity k) that inference runs (`leandit.models.wrappers`)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Mapping

import torch
from torch import nn

from ...models.infer import CheckpointError
from ...models.wrappers import check_wrapper_tensors
from .model import RoutedModel, RoutingSettings

TABLE_VERSION = 1


def saved_state(model: RoutedModel) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(routers and ratios, the JSON table); an unfrozen model is saved at its nearest bins."""
    tensors = {f"blocks.{k}": v for k, v in model.routed_blocks.state_dict().items()}
    tensors["ratios"] = model.ratios.detach()
    table = model.ratio_table()
    return tensors, {
        "version": TABLE_VERSION,
        "settings": asdict(model.settings),
        "tokens": model.num_tokens,
        "schedule": table["schedule"],
        # False: the schedule is the ratios' nearest bins (re-derived from whichever weights
        # load: model or EMA); True: one set with set_schedule, kept as it is.
        "explicit_schedule": model._explicit_schedule is not None,
        "macs_ratio_per_region": table["macs_ratio_per_region"],
    }


def build_saved(inner: nn.Module, tensors: Mapping[str, torch.Tensor], table: Mapping[str, Any]) -> RoutedModel:
    """The routed model of a folder: `inner` (already loaded) with its routers, ratios and schedule."""
    try:
        settings = RoutingSettings(**table["settings"])
        schedule = table["schedule"]
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"the folder's routing table is not one this leandit reads ({err}); re-save the model") from None
    model = RoutedModel(inner, settings)
    expected = {f"blocks.{k}": v for k, v in model.routed_blocks.state_dict().items()}
    expected["ratios"] = model.ratios
    check_wrapper_tensors(expected, tensors, "routing", model.depth)
    model.routed_blocks.load_state_dict({k.removeprefix("blocks."): v for k, v in tensors.items() if k != "ratios"}, strict=True)
    with torch.no_grad():
        model.ratios.copy_(tensors["ratios"])
    try:
        checked = model.check_schedule(schedule)
    except ValueError as err:
        raise CheckpointError(f"the folder's routing schedule does not fit the model: {err}") from None
    if table.get("explicit_schedule"):
        model.set_schedule(checked)
    else:
        model.freeze()
    return model
