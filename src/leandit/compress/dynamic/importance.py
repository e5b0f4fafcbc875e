"""Reorder a block's heads and MLP channels by importance before DyDiT fine-tuning.

Head 0 and MLP group 0 always run, and channels are routed in groups of consecutive
channels, so the order of a pretrained block's heads and channels decides what can never be
skipped and which channels share a router. Reordering them is exact (the block computes the
same function: q/k/v rows and proj columns move together per head, fc1 rows and fc2 columns
per channel), so it changes only what the routers start from.

Importance is read from the weights (no data needed): a head's is the product of the norms
of its value rows and its proj columns (how much it can write to the residual stream), an
MLP channel's the product of its fc1 row norm and fc2 column norm.
"""

from __future__ import annotations

import torch
from torch import nn

from ...models.blocks import block_list
from ...models.dit import DiTBlock


def head_importance(block: DiTBlock) -> torch.Tensor:
    attn = block.attn
    h, dh = attn.num_heads, attn.head_dim
    v = attn.qkv.weight[2 * h * dh:].reshape(h, dh, -1)  # (H, Dh, D) value rows per head
    proj = attn.proj.weight.reshape(attn.proj.weight.shape[0], h, dh)  # (D, H, Dh)
    return v.flatten(1).norm(dim=1) * proj.permute(1, 0, 2).flatten(1).norm(dim=1)  # (H,)


def channel_importance(block: DiTBlock) -> torch.Tensor:
    mlp = block.mlp
    return mlp.fc1.weight.norm(dim=1) * mlp.fc2.weight.norm(dim=0)  # (Dm,)


@torch.no_grad()
def reorder_block(block: DiTBlock) -> tuple[list[int], list[int]]:
    """Sort the block's heads and MLP channels by decreasing importance, in place; returns
    (head order, channel order) as old indices."""
    attn, mlp = block.attn, block.mlp
    h, dh = attn.num_heads, attn.head_dim
    heads = torch.argsort(head_importance(block), descending=True, stable=True)
    columns = (heads[:, None] * dh + torch.arange(dh)).reshape(-1)  # new -> old within q (or k, v)
    rows = torch.cat([columns + part * h * dh for part in range(3)])
    attn.qkv.weight.copy_(attn.qkv.weight[rows])
    if attn.qkv.bias is not None:
        attn.qkv.bias.copy_(attn.qkv.bias[rows])
    attn.proj.weight.copy_(attn.proj.weight[:, columns])
    channels = torch.argsort(channel_importance(block), descending=True, stable=True)
    mlp.fc1.weight.copy_(mlp.fc1.weight[channels])
    if mlp.fc1.bias is not None:
        mlp.fc1.bias.copy_(mlp.fc1.bias[channels])
    mlp.fc2.weight.copy_(mlp.fc2.weight[:, channels])
    return heads.tolist(), channels.tolist()


def reorder_by_importance(model: nn.Module) -> list[dict[str, list[int]]]:
    """Reorder every block of a leandit DiT (or a diffusers DiT / PixArt) in place (before wrapping it); the orders applied."""
    from .diffusers_blocks import BasicTransformerBlock, reorder_block as reorder_diffusers_block

    orders = []
    for block in block_list(model):
        if isinstance(block, BasicTransformerBlock):  # diffusers DiT / PixArt
            heads, channels = reorder_diffusers_block(block)
            orders.append({"heads": heads, "channels": channels})
            continue
        if not isinstance(block, DiTBlock):
            raise TypeError(f"importance reordering works on leandit DiT and diffusers DiT/PixArt blocks, not {type(block).__name__}")
        heads, channels = reorder_block(block)
        orders.append({"heads": heads, "channels": channels})
    return orders
