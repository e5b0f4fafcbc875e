"""A depth-pruned model as a normal model folder, with its history in compression.json."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ... import __version__
from ...backbones import backbone
from ...models.blocks import depth_of, kept_by_list, keep_blocks, list_ranges
from ...models.io import save_model
from .decision import PruningDecision
from .lists import check_kept_lists, list_of, list_records


def pruned_model(
    source: nn.Module,
    decision: PruningDecision,
    weights: Mapping[str, torch.Tensor] | None = None,
    weights_label: str = "original",
    source_name: str | None = None,
) -> nn.Module:
    """A plain model with the decision's kept blocks; no wrapper or adapter left in it.

    Args:
        source: the unpruned model (its weights are used unless `weights` is given).
        weights: a full state dict of the source architecture to take the kept blocks and the
            rest from instead (e.g. with the learned LoRA delta merged).
        weights_label: what `weights` are, for the record ("original", "lora-merged", ...).
        source_name: where the source came from, for the record (default: its `source`).
    """
    depth = depth_of(source)
    if decision.depth != depth:
        raise ValueError(f"the decision is for {decision.depth} blocks but the model has {depth}")
    check_kept_lists(source, decision.kept)  # before any copy: a list the model cannot do without
    per_list = kept_by_list(source, decision.kept)
    pruned = keep_blocks(source, decision.kept)
    if weights is not None:
        pruned.load_state_dict(_kept_weights(weights, per_list), strict=True)
    notes = backbone(source).pruning_notes(list(decision.kept))
    decided = decision.record()
    several = len(per_list) > 1
    if several and decided.get("groups"):
        decided["groups"] = _mark_crossing(decided["groups"], list_ranges(source))
    record: dict[str, Any] = {
        "source": source_name or getattr(source, "source", None),
        **decided,
        # Which list each kept block came from, by its index within that list, and each list's
        # depth in the source (several lists): recovery aligns blocks within their own list.
        **({"kept_by_list": per_list, "source_list_depths": list_records(source)} if several else {}),
        **({"notes": notes} if notes else {}),
        "weights": weights_label,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "leandit": __version__,
    }
    pruned.compression = [*getattr(source, "compression", []), record]
    pruned.source = record["source"]
    return pruned


def export_pruned(
    source: nn.Module,
    decision: PruningDecision,
    folder: str | Path,
    weights: Mapping[str, torch.Tensor] | None = None,
    weights_label: str = "original",
    source_name: str | None = None,
) -> Path:
    """Write the pruned model folder (atomically) and return its path."""
    model = pruned_model(source, decision, weights, weights_label, source_name)
    return save_model(model, folder)


def _mark_crossing(groups: list[dict[str, Any]], ranges) -> list[dict[str, Any]]:
    """The group records, those spanning several block lists marked with `crosses`: the lists."""
    marked = []
    for group in groups:
        names = list(dict.fromkeys(list_of(ranges, int(i)) for i in group["layers"]))
        marked.append({**group, "crosses": names} if len(names) > 1 else group)
    return marked


def _kept_weights(weights: Mapping[str, torch.Tensor], per_list: Mapping[str, list[int]]) -> dict[str, torch.Tensor]:
    """Rename {list}.{kept[i]}.* to {list}.{i}.* in every block list; drop the removed blocks."""
    new_index = {name: {old: new for new, old in enumerate(kept)} for name, kept in per_list.items()}
    out = {}
    for key, value in weights.items():
        name, _, rest = key.partition(".")
        if name in new_index and rest:
            index, tail = rest.split(".", 1)
            if int(index) not in new_index[name]:
                continue
            key = f"{name}.{new_index[name][int(index)]}.{tail}"
        out[key] = value
    return out
