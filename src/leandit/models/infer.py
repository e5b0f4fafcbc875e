"""Infer a DiT/SiT architecture from the tensors of a state dict (original key names).

Every fact comes from a shape: depth from the block count, patch size and channels from
the patch-embedding kernel, input size from the position embedding, classes from the label
table, learned sigma from the output width, MLP ratio from fc1. The head count is not in
the tensors: it comes from the standard table of the paper's sizes or an explicit override.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import torch

from .config import STANDARD_HEADS, DiTConfig

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")
REQUIRED_KEYS = (
    "x_embedder.proj.weight",
    "pos_embed",
    "y_embedder.embedding_table.weight",
    "final_layer.linear.weight",
    "blocks.0.mlp.fc1.weight",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be turned into a model; the message says what and how to fix."""


def infer_dit_config(
    state_dict: Mapping[str, torch.Tensor],
    *,
    num_heads: int | None = None,
    objective: str = "diffusion",
    space: str | None = None,
    has_null_class: bool = True,
    name: str = "",
) -> DiTConfig:
    """The DiTConfig whose network has exactly these tensors.

    Args:
        num_heads: required when the hidden size is not one of the paper's (384, 768,
            1024, 1152).
        objective: "diffusion" (DiT) or "flow" (SiT); the tensors cannot tell them apart.
        space: "latent" or "pixel"; default: latent for 4 input channels, else pixel.
        has_null_class: whether the label table's last row is the guidance null class (true
            for every DiT and SiT release, which trained with 10 % label dropout). leandit's
            own models without a null class are saved as folders, whose config says so.
    """
    missing = [k for k in REQUIRED_KEYS if k not in state_dict]
    if missing:
        raise CheckpointError(
            f"not a DiT/SiT state dict: missing {', '.join(missing)} "
            f"(found keys like {', '.join(list(state_dict)[:4])})"
        )
    patch_w = state_dict["x_embedder.proj.weight"]  # (D, C, p, p)
    hidden, in_channels, patch, patch2 = patch_w.shape
    if patch != patch2:
        raise CheckpointError(f"x_embedder.proj.weight has a non-square kernel {tuple(patch_w.shape)}")
    tokens = state_dict["pos_embed"].shape[-2]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise CheckpointError(f"pos_embed has {tokens} tokens, not a square grid")
    block_ids = {int(m.group(1)) for k in state_dict if (m := _BLOCK_KEY.match(k))}
    depth = len(block_ids)
    if block_ids != set(range(depth)):
        raise CheckpointError(f"block indices are not 0..{depth - 1}: {sorted(block_ids)}")
    rows = state_dict["y_embedder.embedding_table.weight"].shape[0]
    num_classes = rows - 1 if has_null_class else rows
    out_width = state_dict["final_layer.linear.weight"].shape[0]
    out_channels, rem = divmod(out_width, patch * patch)
    if rem or out_channels not in (in_channels, 2 * in_channels):
        raise CheckpointError(
            f"final_layer.linear has {out_width} outputs; expected {patch * patch} x "
            f"{in_channels} or x {2 * in_channels} channels"
        )
    mlp_hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
    mlp_ratio = mlp_hidden / hidden
    while int(hidden * mlp_ratio) < mlp_hidden:  # e.g. 44 * (15/44) = 14.999...: nudge up
        mlp_ratio = math.nextafter(mlp_ratio, math.inf)
    if num_heads is None:
        if hidden not in STANDARD_HEADS:
            raise CheckpointError(
                f"hidden size {hidden} is not a standard DiT size {sorted(STANDARD_HEADS)}: "
                "pass the head count explicitly (num_heads=... / --num-heads)"
            )
        num_heads = STANDARD_HEADS[hidden]
    try:
        return DiTConfig(
            input_size=grid * patch,
            patch_size=patch,
            in_channels=in_channels,
            hidden_size=hidden,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            num_classes=num_classes,
            class_dropout_prob=0.1 if has_null_class else 0.0,
            learn_sigma=out_channels == 2 * in_channels,
            objective=objective,
            space=space or ("latent" if in_channels == 4 else "pixel"),
            name=name,
        )
    except ValueError as err:
        raise CheckpointError(str(err)) from None


def check_keys(expected: Mapping[str, Any], found: Mapping[str, Any], source: str) -> None:
    """Strict loading: the same keys and shapes, or an error that names the difference."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_short(unexpected)}")
        raise CheckpointError(f"{source}: " + "; ".join(parts))
    for key, tensor in expected.items():
        if tuple(tensor.shape) != tuple(found[key].shape):
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(found[key].shape)}, "
                f"the model expects {tuple(tensor.shape)}"
            )


def _short(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")
