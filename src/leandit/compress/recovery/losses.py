"""Hidden-state distillation (RepKD) and its outlier mask, and the schedule of its weight.

Diffusion transformers carry a few "massive activations": single values hundreds of standard
deviations from the rest of their hidden state. A plain MSE between student and teacher
hidden states is dominated by them and diverges (TinyFusion: NaN); dropping every activation
more than k standard deviations from its sample's mean, in the teacher or in the student,
keeps the loss on the ordinary values (k = 2 or 4 work, 0.1 fails).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ...diffusion.gaussian import upcast
from ...train.schedules import linear_anneal


def outlier_mask(hidden: torch.Tensor, k: float) -> torch.Tensor:
    """True where an activation is ordinary: |x - mean| <= k * std, with mean and std taken
    per sample over all of its tokens and channels. hidden: (N, ...) -> bool, same shape."""
    flat = hidden.detach().float().flatten(1)  # (N, T*D)
    mean = flat.mean(dim=1, keepdim=True)
    std = flat.std(dim=1, correction=0, keepdim=True)
    return ((flat - mean).abs() <= k * std).reshape(hidden.shape)


def hidden_state_loss(
    student: torch.Tensor, teacher: torch.Tensor, k: float | None = 2.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Masked) RepKD between two hidden states (N, T, D): per sample, the mean squared
    difference over the activations that are ordinary in both; then the mean over samples
    (a per-sample mean, so K processes with K slices of a batch average to the same loss).
    Returns the loss and the fraction of activations dropped.

    Args:
        k: the outlier threshold in standard deviations; None or inf = plain RepKD (no mask).
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student hidden state {tuple(student.shape)} and teacher's {tuple(teacher.shape)} differ")
    # In float32 even under bf16 autocast: the sum runs over every activation of a sample.
    student = upcast(student)
    squared = (student - upcast(teacher.detach()).to(student.dtype)).flatten(1) ** 2  # (N, T*D)
    if k is None or math.isinf(k):
        return squared.mean(), squared.new_zeros(())
    keep = (outlier_mask(student, k) & outlier_mask(teacher, k)).flatten(1)
    kept = keep.sum(dim=1)  # (N,)
    per_sample = torch.where(keep, squared, torch.zeros_like(squared)).sum(dim=1) / kept.clamp(min=1)
    return per_sample.mean(), 1.0 - kept.float().mean() / keep.shape[1]


def repkd_loss(
    students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor], k: float | None = 2.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """`hidden_state_loss` averaged over aligned layer pairs; (loss, mean dropped fraction)."""
    if len(students) != len(teachers) or not students:
        raise ValueError(f"RepKD needs one teacher hidden state per student layer, got {len(students)} and {len(teachers)}")
    pairs = [hidden_state_loss(s, t, k) for s, t in zip(students, teachers)]
    losses, dropped = zip(*pairs)
    return torch.stack(losses).mean(), torch.stack(dropped).mean()


def repkd_weight(step: int, total_steps: int, start: float) -> float:
    """The RepKD weight at 0-based `step`: `start` at the first step, 0 at the last, linear in
    between (a pure function of the step: exact on resume, safe for a one-step run)."""
    return linear_anneal(step, total_steps, start, 0.0)
