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
        self.updates = 0
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)

    def current_decay(self) -> float:
        if self.warmup:
            return min(self.decay, (1 + self.updates) / (10 + self.updates))
        return self.decay

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        decay = self.current_decay()
        # Frozen weights (LoRA bases, a pruned model's kept layers) never move: skip them.
        pairs = [
            (e, p)
            for e, p in zip(self.shadow.parameters(), module.parameters())
            if p.requires_grad and e.dtype.is_floating_point
        ]
        if pairs:
            ema_params, params = zip(*pairs)
            # One fused call instead of one kernel per tensor.
            torch._foreach_lerp_(list(ema_params), [p.detach() for p in params], 1.0 - decay)
        for e, b in zip(self.shadow.buffers(), module.buffers()):
            e.copy_(b)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
