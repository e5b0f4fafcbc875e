"""One DiT block run at a dynamic width and on a dynamic set of MLP tokens.

`DynamicBlock` wraps a block of the backbone (it does not copy it: the backbone keeps owning
its weights) and adds that block's routers. It runs in one of two ways with the same result:

- masked (training): the block's own branches with per-image head and channel masks and a
  token mask on the MLP update, `x + m_tok * gate * MLP(...)`; every parameter is used, so
  gradients reach every router through the straight-through masks and DDP sees no unused
  weights;
- sliced (inference): the kept heads' q/k/v rows and proj columns and the kept groups' fc1
  rows and fc2 columns, sliced once per width pattern and cached, so no masked dense matmul
  remains; the MLP runs only on the kept tokens of the flattened batch (gathered, then added
  back), so images that keep different numbers of tokens need no padding.

The decisions of a forward (which heads and groups) are handed to the block by its
`DynamicModel` before the backbone runs (`self.plan`); the token decisions are made here,
from the residual stream after the attention residual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...models.attention import attention
from ...models.dit import DiTBlock, modulate
from .routers import TokenRouter, WidthRouters, decide
from .slices import SliceCache


@dataclass
class BlockPlan:
    """What one block runs in one forward.

    head_mask (N, H) and channel_mask (N, Dm) are 0/1 masks (straight-through in training);
    token_noise (N, T) uniforms for the token decisions in training (None: no noise);
    in inference, `patterns` maps a width pattern (kept heads, kept groups) to the images
    that use it."""

    head_mask: torch.Tensor | None = None
    channel_mask: torch.Tensor | None = None
    token_noise: torch.Tensor | None = None
    patterns: list[tuple[tuple[tuple[int, ...], tuple[int, ...]], torch.Tensor | None]] | None = None

    def subset(self, images: torch.Tensor) -> "BlockPlan":
        """The plan of images `images` (M,) of the batch, for a wrapper that runs the block on
        some images at a time (token routing runs each timestep region's images apart)."""
        patterns = None
        if self.patterns is not None:
            position = {int(i): j for j, i in enumerate(images.tolist())}
            patterns = []
            for key, members in self.patterns:
                chosen = list(position) if members is None else [int(i) for i in members.tolist() if int(i) in position]
                if chosen:
                    patterns.append((key, None if len(chosen) == len(position) else
                                     torch.tensor([position[i] for i in chosen], device=images.device)))
        mask = lambda v: v if v is None or v.dim() < 2 else v.index_select(0, images)  # noqa: E731
        return BlockPlan(mask(self.head_mask), mask(self.channel_mask), mask(self.token_noise), patterns)


def setup_dynamic_block(module: nn.Module, block: nn.Module, num_heads: int, head_dim: int, mlp_hidden: int, hidden: int,
                        width: bool, tokens: bool, tau: float) -> None:
    """What every kind of dynamic block holds: the wrapped block, its sizes, its routers."""
    # Not a child module: the backbone owns the block's weights and saves them.
    object.__setattr__(module, "block", block)
    module.num_heads, module.head_dim, module.mlp_hidden, module.hidden_size = num_heads, head_dim, mlp_hidden, hidden
    if mlp_hidden % num_heads:
        raise ValueError(f"the MLP's {mlp_hidden} channels do not split into {num_heads} groups (one per head)")
    module.group_size = mlp_hidden // num_heads
    module.width_routers = WidthRouters(hidden, num_heads, num_heads) if width else None
    module.token_router = TokenRouter(hidden) if tokens else None
    module.tau = tau
    module.plan = None  # a BlockPlan, set by the DynamicModel before each forward
    module.kept_tokens = None  # (N,) kept-token fraction of the last forward
    module._slices = SliceCache()  # pre-sliced weights per width pattern (bounded)


def kept_rows(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The token router's inference decision on x (N, T, D): (x flattened (N*T, D), the kept
    rows (K,), the image of each kept row (K,)); records `kept_tokens` (N,). Gather with
    index_select, not advanced indexing: the same rows, several times faster on CPU."""
    n, t, d = x.shape
    keep = module.token_router(x) > 0  # (N, T)
    module.kept_tokens = keep.to(x.dtype).mean(dim=1)  # (N,)
    rows = keep.reshape(-1).nonzero().squeeze(1)  # (K,) kept rows of the flattened batch
    return x.reshape(n * t, d), rows, rows // t


class DynamicBlock(nn.Module):
    """A `DiTBlock` with DyDiT's routers. `width` / `tokens` switch TDW and SDT on.

    What `DynamicModel` and `MacCounter` read of any dynamic block: `block` (the wrapped
    block), `hidden_size`, `num_heads`, `head_dim`, `mlp_hidden`, `num_groups`, `group_size`,
    `width_routers`, `token_router`, `plan` (set before each forward) and `kept_tokens` (N,)
    after it."""

    def __init__(self, block: DiTBlock, width: bool = True, tokens: bool = True, tau: float = 5.0):
        super().__init__()
        if not isinstance(block, DiTBlock):
            raise TypeError(f"DyDiT wraps leandit DiT blocks; got {type(block).__name__}")
        attn, mlp = block.attn, block.mlp
        setup_dynamic_block(self, block, attn.num_heads, attn.head_dim, mlp.fc1.out_features, attn.qkv.in_features,
                            width, tokens, tau)

    @property
    def num_groups(self) -> int:
        return self.num_heads

    def train(self, mode: bool = True) -> "DynamicBlock":
        self._slices.clear()  # weights may change while training
        return super().train(mode)

    def forward(self, x: torch.Tensor, c: torch.Tensor, t_emb: torch.Tensor | None = None, **unused: Any) -> torch.Tensor:
        plan = self.plan or BlockPlan()
        if self.training or plan.patterns is None:
            return self._masked(x, c, plan)
        return self._sliced(x, c, plan)

    # -- training: masks ---------------------------------------------------------------------
    def _masked(self, x: torch.Tensor, c: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
        block = self.block
        mod = block.modulation(c)
        x = x + block.attention_branch(x, mod, plan.head_mask)  # (N, T, D)
        update = block.mlp_branch(x, mod, plan.channel_mask)  # (N, T, D)
        if self.token_router is None:
            self.kept_tokens = None
            return x + update
        keep = decide(self.token_router(x), self.training, self.tau, plan.token_noise)  # (N, T)
        self.kept_tokens = keep.mean(dim=1)  # (N,), differentiable in training
        return x + keep.unsqueeze(-1).to(update.dtype) * update

    # -- inference: sliced weights, gathered tokens -------------------------------------------
    def _sliced(self, x: torch.Tensor, c: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
        if len(plan.patterns) == 1:
            (pattern, _), = plan.patterns
            return self._sliced_pattern(x, c, pattern)
        out = torch.empty_like(x)
        kept = x.new_empty(x.shape[0])
        for pattern, images in plan.patterns:
            out[images] = self._sliced_pattern(x[images], c[images], pattern)
            if self.kept_tokens is not None:
                kept[images] = self.kept_tokens
        self.kept_tokens = kept if self.token_router is not None else None
        return out

    def _sliced_pattern(self, x: torch.Tensor, c: torch.Tensor, pattern) -> torch.Tensor:
        block = self.block
        qkv_w, qkv_b, proj_w, fc1_w, fc1_b, fc2_w = self._weights(pattern)
        heads = qkv_w.shape[0] // (3 * self.head_dim)
        n, t, d = x.shape
        mod = block.modulation(c)
        h = modulate(block.norm1(x), mod.shift_msa, mod.scale_msa)  # (N, T, D)
        qkv = F.linear(h, qkv_w, qkv_b).reshape(n, t, 3, heads, self.head_dim)  # (N, T, 3, h, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, h, T, Dh)
        a = attention(q, k, v).transpose(1, 2).reshape(n, t, heads * self.head_dim)
        x = x + mod.gate_msa.unsqueeze(1) * F.linear(a, proj_w, block.attn.proj.bias)  # (N, T, D)

        if self.token_router is None:
            self.kept_tokens = None
            h = modulate(block.norm2(x), mod.shift_mlp, mod.scale_mlp)  # (N, T, D)
            return x + mod.gate_mlp.unsqueeze(1) * self._mlp(h, fc1_w, fc1_b, fc2_w)
        flat, rows, image = kept_rows(self, x)
        if rows.numel() == 0:
            return x
        h = block.norm2(flat.index_select(0, rows)) * (1 + mod.scale_mlp.index_select(0, image)) + mod.shift_mlp.index_select(0, image)  # (K, D)
        update = mod.gate_mlp.index_select(0, image) * self._mlp(h, fc1_w, fc1_b, fc2_w)  # (K, D)
        return flat.index_add(0, rows, update.to(flat.dtype)).reshape(n, t, d)

    def _mlp(self, h: torch.Tensor, fc1_w, fc1_b, fc2_w) -> torch.Tensor:
        mlp = self.block.mlp
        return F.linear(mlp.act(F.linear(h, fc1_w, fc1_b)), fc2_w, mlp.fc2.bias)

    def _weights(self, pattern) -> tuple[torch.Tensor, ...]:
        """The block's weights restricted to a width pattern, sliced once and cached (the key
        holds the weights' identity and version, so new or updated weights slice again)."""
        heads, groups = pattern
        attn, mlp = self.block.attn, self.block.mlp
        if len(heads) == self.num_heads and len(groups) == self.num_groups:
            return attn.qkv.weight, attn.qkv.bias, attn.proj.weight, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight
        # Every tensor that is sliced: an update of any one of them (proj or fc2 alone, a bias)
        # must not leave a stale slice behind.
        sliced_from = [p for p in (attn.qkv.weight, attn.qkv.bias, attn.proj.weight, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight)
                       if p is not None]
        def cut() -> tuple[torch.Tensor, ...]:
            full, dh, gs = self.num_heads * self.head_dim, self.head_dim, self.group_size
            head_cols = torch.cat([torch.arange(h * dh, (h + 1) * dh) for h in heads]).to(attn.qkv.weight.device)
            qkv_rows = torch.cat([head_cols + part * full for part in range(3)])  # q, k, v rows of the kept heads
            channels = torch.cat([torch.arange(g * gs, (g + 1) * gs) for g in groups]).to(mlp.fc1.weight.device)
            return (
                attn.qkv.weight[qkv_rows].contiguous(),
                None if attn.qkv.bias is None else attn.qkv.bias[qkv_rows].contiguous(),
                attn.proj.weight[:, head_cols].contiguous(),
                mlp.fc1.weight[channels].contiguous(),
                None if mlp.fc1.bias is None else mlp.fc1.bias[channels].contiguous(),
                mlp.fc2.weight[:, channels].contiguous(),
            )

        return self._slices.get(pattern, sliced_from, cut)
