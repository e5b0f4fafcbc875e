"""Training a backbone on its own objective: teacher pre-training and plain fine-tuning."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..backbones import Conditioning, backbone
from ..diffusion import Objective, StepRandom
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


def drop_conditions(cond: Any, prob: float, conditioning: Conditioning, random: StepRandom) -> Any:
    """Replace each image's conditioning by the unconditional input with probability `prob`
    (class labels by the null class, text by the empty prompt), from the step's randomness."""
    if prob <= 0:
        return cond
    return conditioning.drop(cond, random.rand() < prob)  # (N,) mask


def draw_inputs(
    objective: Objective, batch: Any, random: StepRandom, class_dropout: float, conditioning: Conditioning
) -> tuple[Any, ...]:
    """(x0, t, noise, conditioning after label dropout) of a training step, from the step's
    randomness: every job that trains on the denoising objective draws them this way."""
    x0, cond = batch  # (N, C, H, W), labels (N,) or text {"text": (N, L, D), "text_mask": (N, L)}
    if hasattr(objective, "draw"):  # MAR's: a mask and head rows (a MaskedDraw), the rows' noise
        t, noise = objective.draw(x0, random)
    else:
        t = objective.sample_timesteps(x0.shape[0], random)  # (N,)
        noise = random.randn(*x0.shape[1:])  # (N, C, H, W)
    return x0, t, noise, drop_conditions(cond, class_dropout, conditioning, random)


def job_conditioning(model: nn.Module, class_dropout: float | None, conditioning: Conditioning | None = None) -> tuple[float, Conditioning]:
    """(label-dropout probability, conditioning) of a job on `model`: the dropout defaults to
    the one the model was trained with; dropping needs an unconditional input."""
    spec = backbone(model).spec
    conditioning = conditioning or spec.conditioning
    prob = check_dropout(spec.condition_dropout if class_dropout is None else class_dropout)
    if prob > 0 and not conditioning.has_null:
        if conditioning.kind == "class":
            raise ValueError("label dropout needs a model with a null class; pass --class-dropout 0")
        raise ValueError(f"label dropout of {conditioning.describe()} needs the empty prompt's embedding (from captioned "
                         "data) or --class-dropout 0")
    return prob, conditioning


def stratified_timesteps(random: StepRandom, t: torch.Tensor, regions: int, objective: Objective) -> torch.Tensor:
    """Timesteps with image i of the global batch in region i mod `regions` (uniform within
    it): every region of the trajectory is in every batch, whatever the number of processes
    (methods whose decisions depend on the timestep region: DyDiT widths, routing ratios)."""
    from ..diffusion.flow import LinearFlow

    index = torch.arange(random.start, random.start + random.local, device=t.device)  # global batch index
    u = random.rand()  # (N,)
    where = ((index % regions).to(u.dtype) + u) / regions  # (N,) in [0, 1), region by index
    if isinstance(objective, LinearFlow):
        eps = objective.train_eps
        return eps + (1 - 2 * eps) * where
    steps = objective.num_timesteps
    return (where * steps).long().clamp(max=steps - 1)


class DenoisingJob(TrainingJob):
    """Minimise the model's own objective (DiT diffusion loss or SiT velocity loss).

    `conditioning` overrides the model's (a text model's, with the data's empty prompt)."""

    def __init__(self, model: nn.Module, objective: Objective, class_dropout_prob: float | None = None,
                 conditioning: Conditioning | None = None):
        self.module = backbone(model).prepare()
        self.objective = objective
        self.class_dropout_prob, self.conditioning = job_conditioning(model, class_dropout_prob, conditioning)

    def draw_inputs(self, batch: Any, random: StepRandom) -> tuple[Any, ...]:
        return draw_inputs(self.objective, batch, random, self.class_dropout_prob, self.conditioning)

    def predict(self, module: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """The prediction of the trained model, called through `module` (it may be DDP)."""
        return backbone(self.module).predict(x, t, cond, via=module)

    def compute_loss(self, module: nn.Module, batch: Any, random: StepRandom) -> tuple[torch.Tensor, dict[str, Any]]:
        x0, t, noise, y = self.draw_inputs(batch, random)
        terms = self.objective.training_losses(lambda x, tt: self.predict(module, x, tt, y), x0, t, noise)
        logs = {"mse": terms["mse"].mean()}
        if "vb" in terms:
            logs["vb"] = terms["vb"].mean()
        return terms["loss"].mean(), logs
