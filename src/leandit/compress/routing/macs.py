"""MACs of a routed model, measured rather than modelled.

A block run on k of its N tokens costs a + b k + c k^2 MACs per image: a for what does not
depend on the tokens (adaLN modulation, the text's keys and values), b k for every per-token
matmul, c k^2 for attention among the kept tokens (linear in k when skipped tokens stay as
keys and values). The three coefficients of every block are read off torch's FLOP counter at
three capacities, on a meta copy of the model (nothing is allocated or computed), with the
block's real call: the router's own D MACs per token are included, and so is whatever the
block is (a leandit DiT block, a diffusers DiT or PixArt block with its cross-attention at the
adapter's example prompt length). Everything outside the blocks (embedders, final layer) is
the dense backbone's count minus its blocks'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class RoutedMacs:
    dense_total: int  # MACs per image of the dense backbone
    fixed: float  # MACs per image outside the blocks
    coefficients: torch.Tensor  # (L, 3) float64: block l at k tokens costs c0 + c1 k + c2 k^2 (router included)
    num_tokens: int

    @classmethod
    def of(cls, model: nn.Module) -> "RoutedMacs":
        """The counts of a `RoutedModel` (measured on a meta copy)."""
        from ...backbones import backbone
        from ...models.blocks import block_list
        from ...models.flops import _meta_copy, _register_cpu_attention, forward_flops
        from ...models.wrappers import peel_wrappers
        from .block import RoutePlan, RouteGroup

        _register_cpu_attention()
        dense_total = forward_flops(peel_wrappers(model.inner)[0], 1) // 2
        meta = _meta_copy(model)
        # The blocks' calls are read off the plain backbone (the same arguments reach any
        # wrapper's blocks; a DyDiT model's own decisions cannot run on meta tensors).
        plain = peel_wrappers(meta.inner)[0]
        inner_blocks = block_list(plain)
        calls: dict[int, tuple[tuple, dict]] = {}
        handles = [b.register_forward_pre_hook(lambda m, a, kw, i=i: calls.setdefault(i, (a, kw)) and None, with_kwargs=True)
                   for i, b in enumerate(inner_blocks)]
        try:
            adapter = backbone(plain)
            x, t, cond = adapter.example_inputs(1, "meta")
            with torch.no_grad():
                adapter.predict(x, t, cond)
        finally:
            for h in handles:
                h.remove()
        T = model.num_tokens
        capacities = sorted({T, -(-T // 2), 1})
        rows, dense_blocks = [], 0
        measured_before: dict[tuple, tuple[int, list[float]]] = {}  # identical blocks are counted once
        for i, routed in enumerate(block_list(meta)):
            args, kwargs = calls[i]
            key = _signature(routed, args, kwargs)
            if key not in measured_before:
                dense = _macs(lambda: routed.block(*args, **kwargs))
                measured = []
                for k in capacities:
                    routed.plan = RoutePlan([RouteGroup(None, [(k, None)])])
                    try:
                        measured.append(_macs(lambda: routed(*args, **kwargs)))
                    finally:
                        routed.plan = None
                measured_before[key] = (dense, _quadratic(capacities, measured))
            dense, row = measured_before[key]
            dense_blocks += dense
            rows.append(row)
        return cls(dense_total=dense_total, fixed=float(dense_total - dense_blocks),
                   coefficients=torch.tensor(rows, dtype=torch.float64), num_tokens=T)

    def blocks(self, k: torch.Tensor) -> torch.Tensor:
        """MACs per image of each block at capacities k (L, ...) -> (L, ...)."""
        shape = (-1,) + (1,) * (k.dim() - 1)
        c0, c1, c2 = (self.coefficients[:, j].to(k.device).reshape(shape) for j in range(3))
        k = k.double()
        return c0 + c1 * k + c2 * k * k

    def total(self, k: torch.Tensor) -> torch.Tensor:
        """MACs per image of the whole model with block l at k[l] tokens ((L,) or (L, R) -> () or (R,))."""
        return self.fixed + self.blocks(k).sum(0)

    def ratio(self, macs: torch.Tensor) -> torch.Tensor:
        return macs / self.dense_total


def _signature(routed: nn.Module, args: tuple, kwargs: dict) -> tuple:
    """What a block's count depends on: its kind, its (and a wrapped block's) parameter shapes,
    its routing options and the shapes of its inputs."""
    def shapes(module: nn.Module) -> tuple:
        return tuple((name, tuple(p.shape)) for name, p in module.named_parameters())

    def described(value) -> object:
        if isinstance(value, torch.Tensor):
            return ("tensor", tuple(value.shape), value.dtype)
        if isinstance(value, dict):
            return tuple(sorted((k, described(v)) for k, v in value.items()))
        if isinstance(value, (tuple, list)):
            return tuple(described(v) for v in value)
        return repr(value)

    inner = routed.block
    deeper = getattr(inner, "block", None)
    return (type(inner).__name__, shapes(inner), shapes(deeper) if isinstance(deeper, nn.Module) else None,
            routed.scale, routed.multiplier, routed.skipped_kv, described(args), described(kwargs))


def _macs(call) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        call()
    return counter.get_total_flops() // 2


def _quadratic(ks: list[int], macs: list[int]) -> list[float]:
    """c0, c1, c2 of c0 + c1 k + c2 k^2 through the measured points (fewer points: lower degree)."""
    k = torch.tensor(ks, dtype=torch.float64)
    y = torch.tensor(macs, dtype=torch.float64)
    degree = len(ks)
    basis = torch.stack([k**j for j in range(degree)], dim=1)  # (P, degree)
    coefficients = torch.linalg.solve(basis, y).tolist()
    return coefficients + [0.0] * (3 - degree)
