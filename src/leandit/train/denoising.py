"""Training a backbone on its own objective: teacher pre-training and plain fine-tuning."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..diffusion import Objective, StepRandom
from ..models.dit import DiT
from .loop import TrainingJob


def check_dropout(prob: float) -> float:
    if not 0.0 <= prob < 1.0:  # also refuses NaN
        raise ValueError(f"the label-dropout probability must be in [0, 1), got {prob}")
    return prob


def drop_labels(y: torch.Tensor, prob: float, null_class: int, random: StepRandom) -> torch.Tensor:
    """Replace each label by the null class with probability `prob` (classifier-free guidance
    training). Drawn from the step's randomness, so a student and its teacher can share it."""
    if prob <= 0:
        return y
    drop = random.rand() < prob  # (N,)
    return torch.where(drop, torch.full_like(y, null_class), y)


def draw_inputs(
    objective: Objective, batch: Any, random: StepRandom, class_dropout: float, null_class: int
) -> tuple[torch.Tensor, ...]:
    """(x0, t, noise, labels after label dropout) of a training step, from the step's
    randomness: every job that trains on the denoising objective draws them this way."""
    x0, y = batch  # (N, C, H, W), (N,)
    t = objective.sample_timesteps(x0.shape[0], random)  # (N,)
    noise = random.randn(*x0.shape[1:])  # (N, C, H, W)
    return x0, t, noise, drop_labels(y, class_dropout, null_class, random)


class DenoisingJob(TrainingJob):
    """Minimise the model's own objective (DiT diffusion loss or SiT velocity loss)."""

    def __init__(self, model: DiT, objective: Objective, class_dropout_prob: float | None = None):
        self.module = model
        self.objective = objective
        self.class_dropout_prob = check_dropout(model.config.class_dropout_prob if class_dropout_prob is None else class_dropout_prob)
        if self.class_dropout_prob > 0 and not model.config.has_null_class:
            raise ValueError("label dropout needs a model with a null class (class_dropout_prob > 0 in its config)")

    def draw_inputs(self, batch: Any, random: StepRandom) -> tuple[torch.Tensor, ...]:
        return draw_inputs(self.objective, batch, random, self.class_dropout_prob, self.module.config.num_classes)

    def compute_loss(self, module: nn.Module, batch: Any, random: StepRandom) -> tuple[torch.Tensor, dict[str, Any]]:
        x0, t, noise, y = self.draw_inputs(batch, random)
        terms = self.objective.training_losses(lambda x, tt: module(x, tt, y), x0, t, noise)
        logs = {"mse": terms["mse"].mean()}
        if "vb" in terms:
            logs["vb"] = terms["vb"].mean()
        return terms["loss"].mean(), logs
