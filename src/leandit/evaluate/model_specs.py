"""Models named on a command line: a model folder (leandit or diffusers), a checkpoint file, a
shipped model's name (`digits-teacher`), or a named size with random weights and optional
config overrides (`DiT-XL/2:depth=14`). One resolver for every command."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..assets import shipped_model
from ..models.io import build_model, is_named_size, load_model, parse_named_size

parse_spec = parse_named_size


def open_spec(spec: str, *, allow_random: bool = True, device: str | torch.device = "cpu", **load_options) -> nn.Module:
    """The model a spec names. A named size gives random weights when `allow_random` (for
    speed and size questions); device="meta" builds it without memory or initialisation."""
    if is_named_size(spec):
        if not allow_random:
            raise ValueError(f"{spec!r} is a named size with random weights; pass a model folder or checkpoint file")
        try:
            if str(device) == "meta":
                with torch.device("meta"):
                    return build_model(spec)
            return build_model(spec).to(device)
        except TypeError as err:
            raise ValueError(f"{spec!r}: {err}") from None
    if not Path(spec).exists() and shipped_model(spec) is None:
        named = ", or a named size such as DiT-XL/2 or DiT-XL/2:depth=14" if allow_random else ""
        raise FileNotFoundError(
            f"model not found: {spec} (pass a model folder, a diffusers transformer or pipeline folder, a DiT/SiT "
            f".pt/.safetensors file, a shipped model such as digits-teacher{named})"
        )
    return load_model(spec, device=device if str(device) != "meta" else "cpu", **load_options)
