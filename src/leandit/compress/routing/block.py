"""One block of a backbone run on its top-k tokens only (DiffCR / Mixture-of-Depths routing).

`RoutedBlock` wraps any block of a backbone (it does not copy it: the backbone keeps owning
the weights) and adds that block's router, Linear(hidden, 1, no bias), whose sigmoid scores
the block's input tokens. At capacity k it keeps the k best-scored tokens of each image in
their spatial order, gathers them, calls the block itself on those k tokens (attention among
them only; per-image inputs such as the conditioning pass unchanged), and scatters the result
back; the other tokens leave the block bit-identical to how they came in. A block has no
positional input (positions are added before the first block), so it runs on any subset.

The router learns through the scores of the tokens it keeps: the selected tokens' update is
multiplied by a factor m of their score s. Two things the paper leaves open are options:
- `scale`: "mlp" multiplies only the MLP branch's output (the paper's description), "update"
  the block's whole update y - x;
- `multiplier`: "straight-through" uses m = 1 + s - stop_gradient(s) (value exactly 1, so a
  routed model at ratio 1 is the dense model, gradient ds), "score" uses m = s (the
  Mixture-of-Depths paper's; the model then changes at initialisation);
- `skipped_kv`: the kept tokens' attention also reads the skipped tokens' keys and values
  (leandit DiT blocks only) instead of attending among the kept tokens alone (the paper's).

What runs is set by the `RoutedModel` before each forward (`self.plan`): a list of image
groups (images that share a timestep region), each with one capacity (static inference) or
two capacities and their mixing weights (training between two ratio bins).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ...models.attention import attention
from ...models.dit import DiTBlock, modulate

SCALES = ("mlp", "update")
MULTIPLIERS = ("straight-through", "score")


@dataclass
class RouteGroup:
    """Images (indices, or None = the whole batch) and what they run: [(k, weight)], weight
    None for a single capacity, a differentiable scalar for one of two mixed capacities."""

    images: torch.Tensor | None
    capacities: list[tuple[int, torch.Tensor | None]]


@dataclass
class RoutePlan:
    groups: list[RouteGroup] = field(default_factory=list)


def hidden_size_of(block: nn.Module) -> int:
    """The token width of a block leandit can route."""
    inner = getattr(block, "block", None)  # a DyDiT block around the backbone's block
    if isinstance(block, DiTBlock):
        return block.attn.qkv.in_features
    if hasattr(block, "attn1") and hasattr(block.attn1, "to_q"):  # diffusers BasicTransformerBlock
        return block.attn1.to_q.in_features
    if inner is not None and hasattr(block, "hidden_size"):
        return block.hidden_size
    raise ValueError(f"token routing does not know the width of a {type(block).__name__} block "
                     "(it routes leandit DiT/SiT blocks and diffusers BasicTransformerBlocks)")


def mlp_of(block: nn.Module) -> nn.Module | None:
    """The module whose output is the block's MLP branch (before its gate), or None."""
    if isinstance(block, DiTBlock):
        return block.mlp
    if hasattr(block, "ff") and hasattr(block, "attn1"):  # diffusers: ff(norm(x)) * gate
        return block.ff
    inner = getattr(block, "block", None)
    return mlp_of(inner) if isinstance(inner, nn.Module) else None


class RoutedBlock(nn.Module):
    """A block of the backbone with a token router; `forward` takes the block's own arguments."""

    def __init__(self, block: nn.Module, scale: str = "mlp", multiplier: str = "straight-through", skipped_kv: bool = False):
        super().__init__()
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {', '.join(SCALES)}; got {scale!r}")
        if multiplier not in MULTIPLIERS:
            raise ValueError(f"multiplier must be one of {', '.join(MULTIPLIERS)}; got {multiplier!r}")
        # Not a child module: the backbone owns the block's weights and saves them.
        object.__setattr__(self, "block", block)
        self.hidden_size = hidden_size_of(block)
        self.router = nn.Linear(self.hidden_size, 1, bias=False)
        self.scale, self.multiplier, self.skipped_kv = scale, multiplier, skipped_kv
        object.__setattr__(self, "_mlp", mlp_of(block) if scale == "mlp" else None)  # the block's, not a child
        if scale == "mlp" and self._mlp is None:
            raise ValueError(f"cannot find the MLP branch of a {type(block).__name__} block to scale by the router's "
                             "score; route with scale 'update' (the whole update)")
        if skipped_kv and not isinstance(block, DiTBlock):
            raise ValueError("skipped tokens as extra keys/values are implemented for leandit DiT/SiT blocks only; "
                             f"this block is a {type(block).__name__}: route without it")
        if multiplier == "score" and not isinstance(block, DiTBlock) and scale == "mlp" and hasattr(block, "plan"):
            raise ValueError("a DyDiT block's inference path does not call its MLP module: use the straight-through "
                             "multiplier or scale 'update' to route a DyDiT model")
        self.plan: RoutePlan | None = None  # set by the RoutedModel before each forward
        self.record = False  # keep the kept-token indices of the last forward (for the token maps)
        self.kept: list[tuple[torch.Tensor | None, torch.Tensor]] = []  # [(images, (n, k) token indices)]

    def __getattr__(self, name: str) -> Any:
        # The backbone's own forward may read its blocks' sub-modules (diffusers' DiT takes
        # the conditioning from `transformer_blocks[0].norm1.emb`): they are the wrapped block's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            block = self.__dict__.get("block")
            if block is None:
                raise
            return getattr(block, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        x, args, kwargs = _take_tokens(args, kwargs)
        plan = self.plan
        self.kept = []
        if plan is None or not plan.groups:  # no plan: the dense block (e.g. called outside a RoutedModel)
            return self.block(x, *args, **kwargs)
        logits = self.router(x).squeeze(-1)  # (N, T)
        if len(plan.groups) == 1 and plan.groups[0].images is None:  # the whole batch in one region
            mixed = None
            for k, weight in plan.groups[0].capacities:
                y = self._run(x, logits, k, args, kwargs, None)
                y = y if weight is None else weight.to(y.dtype) * y
                mixed = y if mixed is None else mixed + y
            return mixed
        # Images of several regions: one block call per distinct capacity, on every image
        # that needs it (regions whose ratios share a bin share the call), each output added
        # to its images with their region's mixing weight.
        n = x.shape[0]
        every = torch.arange(n, device=x.device)
        runs: dict[int, list[tuple[torch.Tensor, torch.Tensor | None]]] = {}
        for group in plan.groups:
            images = every if group.images is None else group.images
            for k, weight in group.capacities:
                runs.setdefault(k, []).append((images, weight))
        out = None
        for k, parts in runs.items():
            images = torch.cat([i for i, _ in parts])
            a, kw = _select_images(args, kwargs, images, n)
            with _inner_plan_for(self.block, images):
                y = self._run(x.index_select(0, images), logits.index_select(0, images), k, a, kw, images)
            if any(w is not None for _, w in parts):
                weights = torch.cat([(w.to(y.dtype) if w is not None else y.new_ones(())).expand(len(i)) for i, w in parts])
                y = weights.view(-1, 1, 1) * y
            # Every image's outputs sum to its result: added onto zeros, a single one stays exact.
            out = (torch.zeros_like(x) if out is None else out).index_add(0, images, y.to(x.dtype))
        return out

    def _run(self, x: torch.Tensor, logits: torch.Tensor, k: int, args: tuple, kwargs: dict, images) -> torch.Tensor:
        """The block on the top-k tokens of each image of x (n, T, D); the rest pass through."""
        n, t, d = x.shape
        if k >= t and self.multiplier != "score" and not self._learning():
            if self.record:
                self.kept.append((images, torch.arange(t, device=x.device).expand(n, t)))
            return self.block(x, *args, **kwargs)
        index = logits.topk(min(k, t), dim=1, sorted=False).indices.sort(dim=1).values  # (n, k) in spatial order
        if self.record:
            self.kept.append((images, index.detach()))
        rows = (index + torch.arange(n, device=x.device).unsqueeze(1) * t).reshape(-1)  # (n*k,) rows of the flat batch
        flat = x.reshape(n * t, d)
        kept = flat.index_select(0, rows).reshape(n, -1, d)  # (n, k, D)
        m = self._multiplier(logits.gather(1, index))  # (n, k) or None
        kwargs = _token_mask_for(kwargs, index, t)
        with self._scaled_mlp(m):
            if self.skipped_kv:
                y = _dit_block_with_all_keys(self.block, kept, x, *args, **kwargs)
            else:
                y = self.block(kept, *args, **kwargs)  # (n, k, D)
        if m is not None and self.scale == "update":
            if self.multiplier == "score":
                y = kept + m.unsqueeze(-1) * (y - kept)
            else:  # value exactly y; gradient ds * (y - x)
                y = y + (m - 1).unsqueeze(-1) * (y - kept)
        return flat.index_copy(0, rows, y.reshape(-1, d).to(flat.dtype)).reshape(n, t, d)

    def _learning(self) -> bool:
        return torch.is_grad_enabled() and self.router.weight.requires_grad

    def _multiplier(self, kept_logits: torch.Tensor) -> torch.Tensor | None:
        """The factor of the kept tokens' update (n, k); None when it is exactly 1 and no
        gradient is wanted (inference with the straight-through multiplier)."""
        if self.multiplier == "score":
            return torch.sigmoid(kept_logits)
        if not self._learning():
            return None
        s = torch.sigmoid(kept_logits)
        return 1 + (s - s.detach())

    @contextlib.contextmanager
    def _scaled_mlp(self, m: torch.Tensor | None) -> Iterator[None]:
        if m is None or self.scale != "mlp":
            yield
            return
        factor = m.unsqueeze(-1)  # (n, k, 1)
        handle = self._mlp.register_forward_hook(lambda module, inputs, output: output * factor.to(output.dtype))
        try:
            yield
        finally:
            handle.remove()


@contextlib.contextmanager
def _inner_plan_for(block: nn.Module, images: torch.Tensor | None) -> Iterator[None]:
    """A wrapped block that carries a per-image plan of its own (a DyDiT block) sees the plan of
    the images it runs on."""
    plan = getattr(block, "plan", None)
    if images is None or plan is None or not hasattr(plan, "subset"):
        yield
        return
    block.plan = plan.subset(images)
    try:
        yield
    finally:
        block.plan = plan


def _token_mask_for(kwargs: dict, index: torch.Tensor, tokens: int) -> dict:
    """A self-attention mask over the image tokens (diffusers' `attention_mask`, an additive
    (n, 1, T) bias by the time a block sees it) cut to the kept tokens (n, 1, k)."""
    mask = kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.shape[-1] != tokens:
        return kwargs
    if mask.dim() != 3:
        raise ValueError(f"token routing reads a self-attention mask of shape (batch, 1, tokens); got {tuple(mask.shape)}")
    kept = mask.expand(index.shape[0], -1, -1).gather(-1, index.unsqueeze(1).expand(-1, mask.shape[1], -1))
    return {**kwargs, "attention_mask": kept}


def _take_tokens(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """The token tensor of a block call (first positional, or diffusers' `hidden_states`)."""
    if args:
        return args[0], args[1:], kwargs
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


def _select_images(args: tuple, kwargs: dict, images: torch.Tensor, batch: int) -> tuple[tuple, dict]:
    """The block's other inputs for a subset of the images: every tensor whose first dimension
    is the batch (conditioning, text embeddings and masks, timesteps) is indexed; the rest pass."""

    def pick(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            return value.index_select(0, images)
        if isinstance(value, dict):
            return {k: pick(v) for k, v in value.items()}
        return value

    return tuple(pick(a) for a in args), {k: pick(v) for k, v in kwargs.items()}


def _dit_block_with_all_keys(block: DiTBlock, kept: torch.Tensor, full: torch.Tensor, c: torch.Tensor, *unused: Any,
                             **unused_kw: Any) -> torch.Tensor:
    """A leandit DiT block on the kept tokens (n, k, D) whose attention reads the keys and
    values of every token of `full` (n, T, D): queries, the residuals and the MLP stay on the
    kept tokens."""
    mod = block.modulation(c)
    attn = block.attn
    n, k, d = kept.shape
    heads, dh = attn.num_heads, attn.head_dim
    h_kept = modulate(block.norm1(kept), mod.shift_msa, mod.scale_msa)  # (n, k, D)
    h_full = modulate(block.norm1(full), mod.shift_msa, mod.scale_msa)  # (n, T, D)
    width = heads * dh
    w, b = attn.qkv.weight, attn.qkv.bias
    q = F.linear(h_kept, w[:width], None if b is None else b[:width]).reshape(n, k, heads, dh).transpose(1, 2)
    kv = F.linear(h_full, w[width:], None if b is None else b[width:]).reshape(n, -1, 2, heads, dh)  # (n, T, 2, h, Dh)
    keys, values = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (n, h, T, Dh)
    a = attention(q, keys, values).transpose(1, 2).reshape(n, k, width)
    x = kept + mod.gate_msa.unsqueeze(1) * attn.proj(a)  # (n, k, D)
    return x + block.mlp_branch(x, mod)
