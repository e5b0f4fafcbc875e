"""Exponential moving average of a module's weights."""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay_for_steps(steps: int, maximum: float) -> float:
    """1 - 10 / steps within [0.9, maximum]: a paper's decay for its long runs, and for shorter
    runs an EMA that still averages the last tenth of the run instead of remembering its start
    (0.9999 over 2000 steps would still hold 82 % of the initial weights)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return min(maximum, max(0.9, 1 - 10 / steps))


class EMA:
    """A frozen copy of `module` updated as ema <- decay * ema + (1 - decay) * weights.

    Args:
        decay: the EMA decay (DiT: 0.9999).
        warmup: use min(decay, (1 + n) / (10 + n)) after n updates, so a short run's EMA is
            not dominated by the random initialisation.
    """

    def __init__(self, module: nn.Module, decay: float, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self._updates: torch.Tensor | int = 0  # a tensor on the weights' device once updating
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)

    @property
    def updates(self) -> int:
        """How many updates were applied (read from the device: not once per step)."""
        return int(self._updates)

    def current_decay(self) -> float:
        if self.warmup:
            return min(self.decay, (1 + self.updates) / (10 + self.updates))
        return self.decay

    @torch.no_grad()
    def update(self, module: nn.Module, applied: torch.Tensor | None = None) -> None:
        """One EMA step towards `module`'s weights; `applied` (a 0-d bool tensor, e.g. "this
        step's update was applied") makes it a no-op where false without the host reading it,
        so a GPU step needs no synchronisation."""
        # Frozen weights (LoRA bases, a pruned model's kept layers) never move: skip them.
        pairs = [
            (e, p)
            for e, p in zip(self.shadow.parameters(), module.parameters())
            if p.requires_grad and e.dtype.is_floating_point
        ]
        if pairs:
            device = pairs[0][0].device
            if not isinstance(self._updates, torch.Tensor) or self._updates.device != device:
                self._updates = torch.tensor(float(self._updates), dtype=torch.float64, device=device)
            on = torch.ones((), device=device) if applied is None else applied.to(device=device, dtype=torch.float64)
            n = self._updates
            decay = torch.clamp((1 + n) / (10 + n), max=self.decay) if self.warmup else torch.full_like(n, self.decay)
            weight = (1.0 - decay) * on  # float64: 1 - 0.9999 exact before the cast
            by_dtype: dict[torch.dtype, tuple[list, list]] = {}
            for e, p in pairs:
                ema_list, param_list = by_dtype.setdefault(e.dtype, ([], []))
                ema_list.append(e)
                param_list.append(p.detach())
            for dtype, (ema_list, param_list) in by_dtype.items():
                # One fused call per dtype instead of one kernel per tensor.
                torch._foreach_lerp_(ema_list, param_list, weight.to(dtype))
            self._updates = n + on
        else:
            self._updates = self._updates + (1 if applied is None else applied.to(torch.float64))
        for e, b in zip(self.shadow.buffers(), module.buffers()):
            e.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self._updates = int(state["updates"])
