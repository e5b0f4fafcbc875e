"""DyDiT on diffusers' `BasicTransformerBlock`: the blocks of `DiTTransformer2DModel`
(norm_type "ada_norm_zero") and `PixArtTransformer2DModel` ("ada_norm_single", with a
cross-attention to the text that stays dense).

`DiffusersDynamicBlock` keeps `DynamicBlock`'s contract (the attributes `DynamicModel` and
`MacCounter` read, `plan` before and `kept_tokens` after each forward) and takes the block's
own call signature, as the diffusers transformer calls it (keywords, or positionally under
gradient checkpointing). It runs the block's own sub-modules (norm1, norm2/norm3, the
scale-shift table, attn2, the feed-forward's activation) in `BasicTransformerBlock.forward`'s
order of operations for these two norm types, so with every head, group and token on it
computes what the plain block computes:

- masked (training): self-attention with a per-image head mask on the heads' outputs before
  `to_out`, the feed-forward with a channel-group mask on its hidden channels (after the
  GELU of `ff.net[0]`), and a token mask on the feed-forward update
  `x + m_tok * gate_mlp * FF(...)`;
- sliced (inference): the kept heads' `to_q`/`to_k`/`to_v` rows (fused into one matmul) and
  `to_out[0]` columns, the kept groups' `ff.net[0].proj` rows and `ff.net[2]` columns,
  sliced once per width pattern and cached; the feed-forward runs on the kept tokens of the
  flattened batch only.

The token router reads the residual stream the feed-forward reads (for PixArt: after the
cross-attention residual); self- and cross-attention always see every token.

Only the attention processor diffusers installs by default (`AttnProcessor2_0`) is mirrored:
a block with another processor, fused projections, q/k norms or a gated (GLIGEN) fuser is
refused with the reason.

Importing this module does not import diffusers (seconds of start-up, and an optional
dependency): the table of block kinds holds a stand-in type that matches diffusers'
`BasicTransformerBlock` once diffusers is imported, which it is whenever such a block exists.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...models.attention import attention
from .block import BlockPlan, kept_rows, setup_dynamic_block
from .model import register_dynamic_block
from .routers import decide

NORM_TYPES = ("ada_norm_zero", "ada_norm_single")


class _DiffusersBlockMeta(type):
    def __instancecheck__(cls, obj: Any) -> bool:
        module = sys.modules.get("diffusers.models.attention")
        return module is not None and isinstance(obj, module.BasicTransformerBlock)


class BasicTransformerBlock(metaclass=_DiffusersBlockMeta):
    """Stands for `diffusers.models.attention.BasicTransformerBlock` in `isinstance` checks
    without importing diffusers."""


def check_block(block: nn.Module) -> None:
    """Refuse, with the reason, a diffusers block this wrapper does not compute exactly."""
    if not isinstance(block, BasicTransformerBlock):
        raise TypeError(f"DiffusersDynamicBlock wraps diffusers BasicTransformerBlocks; got {type(block).__name__}")
    from diffusers.models.activations import GELU

    where = "DyDiT on a diffusers BasicTransformerBlock"
    if block.norm_type not in NORM_TYPES:
        raise ValueError(f"{where} supports norm_type {' and '.join(NORM_TYPES)} (DiT, PixArt); this block has {block.norm_type!r}")
    if block.pos_embed is not None or block.only_cross_attention or hasattr(block, "fuser"):
        raise ValueError(f"{where}: blocks with positional embeddings, only cross-attention or a GLIGEN fuser are not supported")
    _check_attention(block.attn1, where)
    if not isinstance(block.ff.net[0], GELU):
        raise ValueError(f"{where} needs a GELU feed-forward (DiT's and PixArt's gelu-approximate); "
                         f"got {type(block.ff.net[0]).__name__}")


def _check_attention(attn: nn.Module, where: str) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    if type(attn.processor) is not AttnProcessor2_0:
        raise ValueError(f"{where} mirrors diffusers' default attention processor (AttnProcessor2_0); the block's "
                         f"self-attention uses {type(attn.processor).__name__}: set the default one back (attn_processors)")
    odd = [name for name in ("norm_q", "norm_k", "spatial_norm", "group_norm") if getattr(attn, name, None) is not None]
    if getattr(attn, "fused_projections", False) or getattr(attn, "to_qkv", None) is not None:
        odd.append("fused projections")
    if attn.residual_connection or attn.rescale_output_factor != 1.0:
        odd.append("residual connection / output rescaling")
    if odd:
        raise ValueError(f"{where}: its self-attention has {', '.join(odd)}, which this wrapper does not compute")


class DiffusersDynamicBlock(nn.Module):
    """A diffusers `BasicTransformerBlock` (DiT or PixArt) with DyDiT's routers; `width` /
    `tokens` switch TDW and SDT on. Same contract as `DynamicBlock`."""

    def __init__(self, block: nn.Module, width: bool = True, tokens: bool = True, tau: float = 5.0):
        super().__init__()
        check_block(block)
        attn = block.attn1
        setup_dynamic_block(self, block, attn.heads, attn.to_q.out_features // attn.heads, block.ff.net[0].proj.out_features,
                            attn.to_q.in_features, width, tokens, tau)
        self._processor = type(attn.processor)  # the default one (check_block)

    @property
    def num_groups(self) -> int:
        return self.num_heads

    @property
    def norm1(self) -> nn.Module:
        # diffusers' DiT head reads `transformer_blocks[0].norm1.emb` while the dynamic blocks
        # stand in the block list.
        return self.block.norm1

    def train(self, mode: bool = True) -> "DiffusersDynamicBlock":
        self._slices.clear()  # weights may change while training
        return super().train(mode)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        class_labels: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        cross_attention_kwargs = dict(cross_attention_kwargs or {})
        if cross_attention_kwargs.pop("gligen", None) is not None:
            raise ValueError("DyDiT's diffusers blocks take no GLIGEN inputs")
        if type(self.block.attn1.processor) is not self._processor:  # changed since wrapping
            _check_attention(self.block.attn1, "DyDiT on a diffusers BasicTransformerBlock")
        inputs = (attention_mask, encoder_hidden_states, encoder_attention_mask, timestep, class_labels)
        plan = self.plan or BlockPlan()
        if self.training or plan.patterns is None:
            return self._masked(hidden_states, inputs, cross_attention_kwargs, plan)
        if len(plan.patterns) == 1:
            (pattern, _), = plan.patterns
            return self._sliced(hidden_states, inputs, cross_attention_kwargs, pattern)
        n = hidden_states.shape[0]
        out = torch.empty_like(hidden_states)
        kept = hidden_states.new_empty(n)
        for pattern, images in plan.patterns:
            sub = tuple(_take(value, images, n) for value in inputs)
            out[images] = self._sliced(hidden_states[images], sub, cross_attention_kwargs, pattern)
            if self.kept_tokens is not None:
                kept[images] = self.kept_tokens
        self.kept_tokens = kept if self.token_router is not None else None
        return out

    # -- the parts every path shares (BasicTransformerBlock.forward's order) -----------------
    def _modulation(self, x: torch.Tensor, timestep, class_labels) -> tuple[torch.Tensor, ...]:
        """(the self-attention's input (N, T, D), gate_msa, shift_mlp, scale_mlp, gate_mlp (N, 1, D))."""
        block = self.block
        if block.norm_type == "ada_norm_zero":
            h, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(x, timestep, class_labels, hidden_dtype=x.dtype)
            return h, gate_msa.unsqueeze(1), shift_mlp.unsqueeze(1), scale_mlp.unsqueeze(1), gate_mlp.unsqueeze(1)
        n = x.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            block.scale_shift_table[None] + timestep.reshape(n, 6, -1)
        ).chunk(6, dim=1)  # each (N, 1, D)
        h = block.norm1(x) * (1 + scale_msa) + shift_msa
        return h, gate_msa, shift_mlp, scale_mlp, gate_mlp

    def _cross_attention(self, x: torch.Tensor, inputs, kwargs: dict[str, Any]) -> torch.Tensor:
        block = self.block
        if block.attn2 is None:
            return x
        _, encoder_hidden_states, encoder_attention_mask, _, _ = inputs
        h = x if block.norm_type == "ada_norm_single" else block.norm2(x)  # PixArt applies no norm here
        out = block.attn2(h, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask, **kwargs)
        return out + x

    def _ff_input(self, x: torch.Tensor, shift_mlp: torch.Tensor, scale_mlp: torch.Tensor) -> torch.Tensor:
        block = self.block
        norm = block.norm2 if block.norm_type == "ada_norm_single" else block.norm3
        return norm(x) * (1 + scale_mlp) + shift_mlp

    def _self_attention_mask(self, attention_mask, n: int, t: int) -> torch.Tensor | None:
        """The self-attention mask as the processor prepares it, (N, heads, T or 1, T)."""
        if attention_mask is None:
            return None
        attn = self.block.attn1
        mask = attn.prepare_attention_mask(attention_mask, t, n)
        return mask.view(n, attn.heads, -1, mask.shape[-1])

    # -- training: masks ---------------------------------------------------------------------
    def _masked(self, x: torch.Tensor, inputs, kwargs: dict[str, Any], plan: BlockPlan) -> torch.Tensor:
        attention_mask, _, _, timestep, class_labels = inputs
        h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self._modulation(x, timestep, class_labels)
        x = gate_msa * self._attention_masked(h, attention_mask, plan.head_mask) + x
        x = self._cross_attention(x, inputs, kwargs)
        update = gate_mlp * self._ff_masked(self._ff_input(x, shift_mlp, scale_mlp), plan.channel_mask)  # (N, T, D)
        if self.token_router is None:
            self.kept_tokens = None
            return update + x
        keep = decide(self.token_router(x), self.training, self.tau, plan.token_noise)  # (N, T)
        self.kept_tokens = keep.mean(dim=1)  # (N,), differentiable in training
        return keep.unsqueeze(-1).to(update.dtype) * update + x

    def _attention_masked(self, h: torch.Tensor, attention_mask, head_mask: torch.Tensor | None) -> torch.Tensor:
        attn = self.block.attn1
        n, t, _ = h.shape
        q, k, v = attn.to_q(h), attn.to_k(h), attn.to_v(h)
        heads, dh = attn.heads, k.shape[-1] // attn.heads
        q, k, v = (z.view(n, -1, heads, dh).transpose(1, 2) for z in (q, k, v))  # (N, H, T, Dh)
        mask = self._self_attention_mask(attention_mask, n, t)
        a = attention(q, k, v, attn_mask=mask)  # (N, H, T, Dh)
        if head_mask is not None:
            a = a * head_mask[:, :, None, None].to(a.dtype)
        a = a.transpose(1, 2).reshape(n, -1, heads * dh).to(q.dtype)
        return attn.to_out[1](attn.to_out[0](a))  # to_out[1]: dropout

    def _ff_masked(self, h: torch.Tensor, channel_mask: torch.Tensor | None) -> torch.Tensor:
        net = self.block.ff.net
        h = net[0](h)  # proj, then GELU: (N, T, Dm)
        if channel_mask is not None:
            h = h * channel_mask[:, None, :].to(h.dtype)
        for module in net[1:]:  # dropout, proj back (and a final dropout)
            h = module(h)
        return h

    # -- inference: sliced weights, gathered tokens -------------------------------------------
    def _sliced(self, x: torch.Tensor, inputs, kwargs: dict[str, Any], pattern) -> torch.Tensor:
        attention_mask, _, _, timestep, class_labels = inputs
        qkv_w, qkv_b, out_w, proj_w, proj_b, down_w = self._weights(pattern)
        block = self.block
        heads = qkv_w.shape[0] // (3 * self.head_dim)
        n, t, d = x.shape
        h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self._modulation(x, timestep, class_labels)
        qkv = F.linear(h, qkv_w, qkv_b).view(n, t, 3, heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, h, T, Dh)
        mask = self._self_attention_mask(attention_mask, n, t)
        if mask is not None:
            mask = mask[:, :1]  # the same for every head: broadcast over the kept ones
        a = attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(n, t, heads * self.head_dim)
        x = gate_msa * F.linear(a.to(q.dtype), out_w, block.attn1.to_out[0].bias) + x  # (N, T, D)
        x = self._cross_attention(x, inputs, kwargs)

        if self.token_router is None:
            self.kept_tokens = None
            return gate_mlp * self._ff(self._ff_input(x, shift_mlp, scale_mlp), proj_w, proj_b, down_w) + x
        flat, rows, image = kept_rows(self, x)
        if rows.numel() == 0:
            return x
        h = self._ff_input(flat.index_select(0, rows), shift_mlp[:, 0].index_select(0, image),
                           scale_mlp[:, 0].index_select(0, image))  # (K, D)
        update = gate_mlp[:, 0].index_select(0, image) * self._ff(h, proj_w, proj_b, down_w)  # (K, D)
        return flat.index_add(0, rows, update.to(flat.dtype)).reshape(n, t, d)

    def _ff(self, h: torch.Tensor, proj_w, proj_b, down_w) -> torch.Tensor:
        net = self.block.ff.net
        return F.linear(net[0].gelu(F.linear(h, proj_w, proj_b)), down_w, net[2].bias)  # dropouts: off in eval

    def _weights(self, pattern) -> tuple[torch.Tensor | None, ...]:
        """(q/k/v rows fused, their bias, to_out[0] columns, ff proj rows, their bias, ff.net[2]
        columns) of a width pattern, sliced once and cached (the key holds the weights' identity
        and version, so new or updated weights slice again)."""
        heads, groups = pattern
        attn, net = self.block.attn1, self.block.ff.net
        linears = (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0], net[0].proj, net[2])
        sources = [t for m in linears for t in (m.weight, m.bias)]

        def cut() -> tuple:
            dh, gs = self.head_dim, self.group_size
            device = attn.to_q.weight.device
            cols = torch.cat([torch.arange(h * dh, (h + 1) * dh) for h in heads]).to(device)
            channels = torch.cat([torch.arange(g * gs, (g + 1) * gs) for g in groups]).to(device)
            full = len(heads) == self.num_heads and len(groups) == self.num_groups
            parts = (attn.to_q, attn.to_k, attn.to_v)
            qkv_w = torch.cat([p.weight if full else p.weight[cols] for p in parts])
            biases = [p.bias for p in parts]
            qkv_b = None if all(b is None for b in biases) else torch.cat(
                [(b if full else b[cols]) if b is not None else p.weight.new_zeros(len(cols)) for p, b in zip(parts, biases)])
            return (
                qkv_w.contiguous(),
                None if qkv_b is None else qkv_b.contiguous(),
                attn.to_out[0].weight if full else attn.to_out[0].weight[:, cols].contiguous(),
                net[0].proj.weight if full else net[0].proj.weight[channels].contiguous(),
                net[0].proj.bias if full or net[0].proj.bias is None else net[0].proj.bias[channels].contiguous(),
                net[2].weight if full else net[2].weight[:, channels].contiguous(),
            )

        return self._slices.get(pattern, sources, cut)


@torch.no_grad()
def reorder_block(block: nn.Module) -> tuple[list[int], list[int]]:
    """`leandit.compress.dynamic.importance.reorder_block` for a diffusers block: its
    self-attention heads (to_q/to_k/to_v rows and to_out[0] columns together) and feed-forward
    channels (ff.net[0].proj rows, ff.net[2] columns) sorted by the same weight-magnitude
    importance, in place (exact up to rounding); (head order, channel order) as old indices."""
    check_block(block)
    attn, net = block.attn1, block.ff.net
    h = attn.heads
    dh = attn.to_q.out_features // h
    out = attn.to_out[0].weight  # (D, H*Dh)
    values = attn.to_v.weight.reshape(h, -1).norm(dim=1)  # (H,) value rows per head
    writes = out.reshape(out.shape[0], h, dh).permute(1, 0, 2).flatten(1).norm(dim=1)  # (H,) to_out columns per head
    importance = values * writes
    heads = torch.argsort(importance, descending=True, stable=True)
    cols = (heads[:, None] * dh + torch.arange(dh)).reshape(-1)  # new -> old
    for layer in (attn.to_q, attn.to_k, attn.to_v):
        layer.weight.copy_(layer.weight[cols])
        if layer.bias is not None:
            layer.bias.copy_(layer.bias[cols])
    out.copy_(out[:, cols])
    proj, down = net[0].proj, net[2]
    channels = torch.argsort(proj.weight.norm(dim=1) * down.weight.norm(dim=0), descending=True, stable=True)
    proj.weight.copy_(proj.weight[channels])
    if proj.bias is not None:
        proj.bias.copy_(proj.bias[channels])
    down.weight.copy_(down.weight[:, channels])
    return heads.tolist(), channels.tolist()


def _take(value: Any, images: torch.Tensor, n: int) -> Any:
    """The rows of `images` of a per-image input (batch-first tensors of batch n); others as they are."""
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == n:
        return value[images]
    return value


register_dynamic_block(BasicTransformerBlock, DiffusersDynamicBlock)

__all__ = ["BasicTransformerBlock", "DiffusersDynamicBlock", "check_block", "reorder_block"]
