"""Models named on a command line for measuring: a model folder, a checkpoint file, or a
named size with random weights and optional config overrides, e.g. `DiT-XL/2:depth=14`."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..models import NAMED_CONFIGS, build_model, load_model


def parse_spec(spec: str) -> tuple[str, dict]:
    """("DiT-XL/2", {"depth": 14}) for "DiT-XL/2:depth=14"; (spec, {}) for anything else."""
    name, _, rest = spec.partition(":")
    if name not in NAMED_CONFIGS:
        return spec, {}
    overrides = {}
    for item in filter(None, rest.split(",")):
        field, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"{spec!r}: overrides are FIELD=VALUE, e.g. {name}:depth=14")
        try:
            overrides[field.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[field.strip()] = value
    return name, overrides


def open_spec(spec: str, **load_options) -> nn.Module:
    """The model a spec names (random weights for a named size)."""
    name, overrides = parse_spec(spec)
    if name in NAMED_CONFIGS:
        try:
            return build_model(name, **overrides)
        except TypeError as err:
            raise ValueError(f"{spec!r}: {err}") from None
    if not Path(spec).exists():
        raise FileNotFoundError(f"model not found: {spec} (pass a model folder, a checkpoint file, or a named size such as "
                                f"DiT-XL/2 or DiT-XL/2:depth=14)")
    return load_model(spec, **load_options)
