"""Schedules as pure functions of the step: nothing to save, exact on resume, safe for any
run length (a one-step run divides by nothing)."""

from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "cosine", "linear")


def lr_factor(step: int, total_steps: int, schedule: str = "constant", warmup_steps: int = 0, final_ratio: float = 1.0) -> float:
    """Multiplier of the base learning rate at 0-based `step` of `total_steps`.

    Linear warm-up from 1/warmup_steps to 1 over the first `warmup_steps`, then "constant",
    "cosine" (from 1 to `final_ratio`; TinyFusion recovery decays to 0.5) or "linear" (from
    1 to `final_ratio`) over the remaining steps, reaching `final_ratio` at the last step.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {LR_SCHEDULES}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "cosine":
        return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - (1.0 - final_ratio) * progress


def linear_anneal(step: int, total_steps: int, start: float, end: float) -> float:
    """start at step 0, end at the last step (total_steps - 1), linear in between."""
    if total_steps <= 1:
        return end
    progress = min(1.0, max(0.0, step / (total_steps - 1)))
    return start + (end - start) * progress
