"""MACs of a dynamic model from its actual decisions, attention's N^2 term included.

Per block and image, with T tokens of width D, head width Dh, h kept heads, c kept MLP
channels and a fraction tau of the tokens through the MLP:
    attention  h * Dh * (4 T D + 2 T^2)    (q, k, v and proj rows/columns of the kept heads,
                                             QK^T and AV per kept head)
    MLP        c * tau * T * 2 D           (fc1 rows and fc2 columns, kept tokens only)
Everything else (patch and timestep embedders, adaLN modulation, final layer) is what
`leandit.models.flops` counts for the dense backbone minus its blocks' attention and MLP,
and the routers themselves (and the timestep embedding they read) are counted too: a
dynamic model with everything on costs slightly more than the dense one. The ratio a DyDiT
target refers to is this whole-model count over the dense model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class MacCounter:
    depth: int
    tokens: int
    hidden: int
    head_dim: int
    num_heads: int
    mlp_hidden: int
    dense_total: int  # MACs per image of the dense backbone
    routers: int  # MACs per image of every router and the timestep embedding they read
    routed_width: bool = True  # heads and MLP groups are routed (TDW)
    routed_tokens: bool = True  # which tokens go through the MLP is routed (SDT)

    @classmethod
    def of(cls, model: nn.Module) -> "MacCounter":
        from ...backbones import backbone
        from ...models.flops import _meta_copy, _register_cpu_attention, forward_flops

        inner = model.backbone
        first = model.dynamic_blocks[0]
        T, D = model.num_tokens, first.hidden_size
        routers = 0
        if model.settings.width:
            routers += model.depth * 2 * D * (first.num_heads - 1)
            _register_cpu_attention()
            adapter = backbone(_meta_copy(inner))
            _, t, _ = adapter.example_inputs(1, "meta")
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                adapter.timestep_embedding(t)
            routers += counter.get_total_flops() // 2
        if model.settings.tokens:
            inner_size = first.token_router.inner_size
            routers += model.depth * T * (D * inner_size + inner_size)
        return cls(
            depth=model.depth, tokens=T, hidden=D, head_dim=first.head_dim, num_heads=first.num_heads,
            mlp_hidden=first.mlp_hidden, dense_total=forward_flops(inner, 1) // 2, routers=int(routers),
            routed_width=model.settings.width, routed_tokens=model.settings.tokens,
        )

    def attention(self, heads, tokens=None):
        """MACs of attention with `heads` kept heads over `tokens` tokens (default: all)."""
        tokens = self.tokens if tokens is None else tokens
        return heads * self.head_dim * (4 * tokens * self.hidden + 2 * tokens**2)

    def mlp(self, channels, token_fraction, tokens=None):
        tokens = self.tokens if tokens is None else tokens
        return channels * token_fraction * tokens * 2 * self.hidden

    @property
    def fixed(self) -> int:
        """MACs that no decision changes: embedders, adaLN, final layer (not the routers)."""
        return self.dense_total - self.depth * (self.attention(self.num_heads) + self.mlp(self.mlp_hidden, 1))

    def dynamic(self, heads: torch.Tensor, channels: torch.Tensor, token_fraction: torch.Tensor) -> torch.Tensor:
        """MACs per image (N,) for kept heads, channels and token fractions (N, L) per block."""
        blocks = self.attention(heads) + self.mlp(channels, token_fraction)  # (N, L)
        return self.fixed + self.routers + blocks.sum(dim=1)

    def routed(self, heads: torch.Tensor, channels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """MACs per image (N,) when block l runs on tokens[:, l] of the tokens (token routing
        around a DyDiT model made without token routers), heads and channels as in `dynamic`."""
        blocks = self.attention(heads, tokens) + self.mlp(channels, 1.0, tokens)  # (N, L)
        return self.fixed + self.routers + blocks.sum(dim=1)

    def ratio(self, macs: torch.Tensor) -> torch.Tensor:
        return macs / self.dense_total

    def minimum_ratio(self) -> float:
        """The cheapest a model can get: head 0 and group 0 only (every head and channel when
        the width is not dynamic), no token through any MLP (every token when tokens are not)."""
        per_block = self.attention(1 if self.routed_width else self.num_heads)
        if not self.routed_tokens:
            per_block += self.mlp(self.mlp_hidden // self.num_heads if self.routed_width else self.mlp_hidden, 1)
        return (self.fixed + self.routers + self.depth * per_block) / self.dense_total

    def width_table_ratio(self, heads: torch.Tensor, groups: torch.Tensor) -> float:
        """Mean MAC ratio over a width table's timesteps (heads, groups (L, T) counts), every
        token through the MLP."""
        channels = groups * (self.mlp_hidden // self.num_heads)
        blocks = self.attention(heads.double()) + self.mlp(channels.double(), 1.0)  # (L, T)
        return float(((self.fixed + self.routers + blocks.sum(0)) / self.dense_total).mean())
