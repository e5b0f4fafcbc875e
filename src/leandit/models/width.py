"""Static width pruning: keep the first heads of every attention and the first channels of
every MLP, slicing the weights (the same computation as masking the others to zero).

Used to measure what width pruning buys in wall-clock time (`leandit bench --curve`, the
TinyFusion paper's Figure 4). The config of a leandit model folder cannot yet describe heads
narrower than hidden / num_heads, so these models are for measuring, not for saving.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .blocks import block_list


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


@torch.no_grad()
def slice_width(model: nn.Module, heads: int, mlp_hidden: int) -> nn.Module:
    """A copy of `model` whose blocks keep their first `heads` attention heads and first
    `mlp_hidden` MLP channels."""
    narrow = copy.deepcopy(model)
    for block in block_list(narrow):
        attn, mlp = block.attn, block.mlp
        if not 1 <= heads <= attn.num_heads or not 1 <= mlp_hidden <= mlp.fc1.out_features:
            raise ValueError(f"keep 1..{attn.num_heads} heads and 1..{mlp.fc1.out_features} MLP channels, got {heads} and {mlp_hidden}")
        inner, full = heads * attn.head_dim, attn.num_heads * attn.head_dim
        rows = torch.cat([torch.arange(inner) + part * full for part in range(3)])  # q, k, v rows of the kept heads
        attn.qkv = _linear(attn.qkv.weight[rows], attn.qkv.bias[rows] if attn.qkv.bias is not None else None)
        attn.proj = _linear(attn.proj.weight[:, :inner], attn.proj.bias)
        attn.num_heads = heads
        mlp.fc1 = _linear(mlp.fc1.weight[:mlp_hidden], mlp.fc1.bias[:mlp_hidden] if mlp.fc1.bias is not None else None)
        mlp.fc2 = _linear(mlp.fc2.weight[:, :mlp_hidden], mlp.fc2.bias)
    return narrow
