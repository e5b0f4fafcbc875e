"""Fast multistep samplers through diffusers' scheduler classes: DPM-Solver++ (2M) and UniPC,
for epsilon models (DiT, PixArt: the Gaussian diffusion's own betas) and for velocity models
(SiT: diffusers' flow-matching sigmas), with the timestep spacings diffusers offers.

diffusers' flow convention runs sigma from 1 (noise) to 0 (data) with x = (1 - sigma) data +
sigma noise and predicts noise - data; SiT's time is t = 1 - sigma and its velocity is
data - noise, so the scheduler is given -v at t = 1 - timestep / 1000.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch

SOLVERS = ("dpm++2m", "unipc")
SPACINGS = ("linspace", "leading", "trailing")
FLOW_TRAIN_STEPS = 1000  # diffusers' flow schedulers count sigma in thousandths
DEFAULT_SOLVER_STEPS = 20  # model evaluations when none are asked

ModelOutputFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, scheduler timestep) -> its prediction


@dataclass(frozen=True)
class SolverSettings:
    """Options of the multistep solvers (diffusers' defaults).

    Args:
        spacing: diffusers' `timestep_spacing`: linspace, leading or trailing.
        karras: Karras et al.'s sigma spacing instead.
        flow_shift: velocity models: sigma -> shift sigma / (1 + (shift - 1) sigma), SD3's
            3.0 puts more steps at high noise (1 = none).
    """

    spacing: str = "linspace"
    karras: bool = False
    flow_shift: float = 1.0

    def __post_init__(self) -> None:
        if self.spacing not in SPACINGS:
            raise ValueError(f"unknown timestep spacing {self.spacing!r}; choose one of {', '.join(SPACINGS)}")
        if not self.flow_shift > 0:
            raise ValueError(f"the flow shift must be positive, got {self.flow_shift}")

    def record(self) -> dict[str, Any]:
        return asdict(self)


def make_scheduler(solver: str, settings: SolverSettings, *, betas: np.ndarray | None = None, clip_denoised: bool = False):
    """The diffusers scheduler of `solver`: for an epsilon model with `betas` (its training
    schedule), for a velocity model without. `clip_denoised` clamps each predicted x0 to
    [-1, 1] (diffusers' thresholding with sample_max_value 1), as DDPM/DDIM do for pixels."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler  # slow to import

    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    options: dict[str, Any] = dict(timestep_spacing=settings.spacing, use_karras_sigmas=settings.karras,
                                   thresholding=clip_denoised, sample_max_value=1.0, solver_order=2)
    if betas is None:
        options.update(num_train_timesteps=FLOW_TRAIN_STEPS, prediction_type="flow_prediction", use_flow_sigmas=True,
                       flow_shift=settings.flow_shift)
    else:
        options.update(num_train_timesteps=len(betas), trained_betas=np.asarray(betas, dtype=np.float64).tolist(),
                       prediction_type="epsilon")
    if solver == "dpm++2m":
        return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **options)
    return UniPCMultistepScheduler(predict_x0=True, solver_type="bh2", **options)


def solve(scheduler, predict: ModelOutputFn, x: torch.Tensor, steps: int) -> torch.Tensor:
    """Run `scheduler` for `steps` model evaluations from x (standard normal noise)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    scheduler.set_timesteps(steps, device=x.device)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = predict(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x).prev_sample
    return x


def flow_time(timestep: torch.Tensor) -> float:
    """SiT's t for a diffusers flow scheduler timestep (sigma * 1000)."""
    return 1.0 - float(timestep) / FLOW_TRAIN_STEPS
