"""Wrappers that compression methods put around a backbone, saved in the same model folder.

A method that adds weights or tables to a model (routers, a per-timestep width table, a
capacity schedule) wraps the backbone in an `nn.Module` and registers how to take the
wrapper apart and put it back:

    register_wrapper(WrapperType(
        name="dydit-width",                     # recorded in the folder
        cls=DynamicWidth,                       # the wrapper class
        inner=lambda w: w.backbone,             # the module it wraps (a backbone or a wrapper)
        state=lambda w: (w.router_state_dict(), w.table()),  # its own tensors and JSON table
        build=lambda inner, tensors, table: DynamicWidth.from_saved(inner, tensors, table),
    ))

`save_model(wrapper, folder)` then writes the backbone's files as usual, each wrapper's own
tensors as `wrapper-<i>-<name>.safetensors` and the list of wrappers (innermost first, with
their tables) in the folder's metadata; `load_model(folder)` rebuilds the backbone and wraps
it again in the same order. One format for every method: nothing new per method but its row.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .infer import CheckpointError


@dataclass(frozen=True)
class WrapperType:
    name: str
    cls: type
    inner: Callable[[nn.Module], nn.Module]
    state: Callable[[nn.Module], tuple[Mapping[str, torch.Tensor], dict[str, Any]]]
    build: Callable[[nn.Module, Mapping[str, torch.Tensor], dict[str, Any]], nn.Module]


WRAPPERS: dict[str, WrapperType] = {}
# leandit's own methods register their wrappers when imported; a folder naming one imports it.
BUILTIN_WRAPPERS: dict[str, str] = {"dydit": "leandit.compress.dynamic", "diffcr": "leandit.compress.routing",
                                  "inpaint": "leandit.models.inpaint", "step-cache": "leandit.compress.step_cache"}


def register_wrapper(wrapper: WrapperType) -> WrapperType:
    if wrapper.name in WRAPPERS and WRAPPERS[wrapper.name].cls is not wrapper.cls:
        raise ValueError(f"a wrapper named {wrapper.name!r} is already registered for {WRAPPERS[wrapper.name].cls.__name__}")
    WRAPPERS[wrapper.name] = wrapper
    return wrapper


def _type_of(module: nn.Module) -> WrapperType | None:
    for wrapper in WRAPPERS.values():
        if type(module) is wrapper.cls:
            return wrapper
    return None


def peel_wrappers(model: nn.Module) -> tuple[nn.Module, list[tuple[WrapperType, nn.Module]]]:
    """(the innermost module, the registered wrappers around it, innermost first)."""
    layers: list[tuple[WrapperType, nn.Module]] = []
    while (wrapper := _type_of(model)) is not None:
        layers.append((wrapper, model))
        model = wrapper.inner(model)
    return model, layers[::-1]


def write_wrappers(
    folder: Path, layers: list[tuple[WrapperType, nn.Module]], table_layers: list[tuple[WrapperType, nn.Module]] | None = None
) -> list[dict[str, Any]]:
    """Write each wrapper's tensors; the records to store in the folder's metadata. Tables
    come from `table_layers` when given (the EMA copy's: what `load_model` gives by default)."""
    from .io import save_tensors

    records = []
    for i, (wrapper, module) in enumerate(layers):
        tensors, table = wrapper.state(module)
        if table_layers is not None:
            table = wrapper.state(table_layers[i][1])[1]
        record: dict[str, Any] = {"type": wrapper.name, "table": table}
        if tensors:
            record["weights"] = f"wrapper-{i}-{wrapper.name}.safetensors"
            save_tensors(tensors, folder / record["weights"])
        records.append(record)
    return records


def check_wrapper_tensors(expected: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor], what: str, depth: int) -> None:
    """Refuse a wrapper's saved tensors that do not fit the model it wraps (`what`: "DyDiT
    router", "routing") or hold NaN/inf, naming a few of the keys."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tuple(tensors[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        parts = [f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else "",
                 f"mis-shaped {wrong[:3]}" if wrong else ""]
        raise CheckpointError(
            f"the {what} weights do not fit this {depth}-block model ({'; '.join(p for p in parts if p)}): "
            "the router file belongs to another model or is damaged"
        )
    if any(not torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point()):
        raise CheckpointError(f"the {what} weights hold NaN or inf values: the router file is damaged")


def apply_wrappers(model: nn.Module, records: list[dict[str, Any]], folder: Path) -> nn.Module:
    """Wrap `model` again as the folder's records say (innermost first)."""
    from .io import read_safetensors

    for record in records:
        name = record.get("type")
        if name not in WRAPPERS and name in BUILTIN_WRAPPERS:
            importlib.import_module(BUILTIN_WRAPPERS[name])
        if name not in WRAPPERS:
            raise CheckpointError(
                f"{folder}: the model is wrapped by {name!r}, which this leandit does not know "
                f"(known: {', '.join(WRAPPERS) or 'none'}); upgrade leandit or import the package that registers it"
            )
        file = record.get("weights")
        tensors = read_safetensors(folder / file) if file else {}
        model = WRAPPERS[name].build(model, tensors, record.get("table") or {})
    return model


__all__ = ["WRAPPERS", "WrapperType", "apply_wrappers", "check_wrapper_tensors", "peel_wrappers", "register_wrapper", "write_wrappers"]
