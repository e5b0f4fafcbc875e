"""Training objectives and samplers: DiT's Gaussian diffusion and SiT's flow transport.

Both expose the same small interface, so training and sampling code never asks which one
it has: `sample_timesteps(n, random)`, `training_losses(model_fn, x0, t, noise)`,
`sample(model_fn, noise, sampler=..., steps=..., ...)`, `samplers`, `default_sampler`.
"""

from __future__ import annotations

from typing import Union

from ..models.config import DiTConfig
from .flow import LinearFlow
from .gaussian import GaussianDiffusion, linear_betas, space_timesteps
from .noise import PerSampleNoise, StepRandom, mix_seed

Objective = Union[GaussianDiffusion, LinearFlow]


def make_objective(config: DiTConfig) -> Objective:
    """The objective a model of this config was trained with."""
    if config.objective == "flow":
        return LinearFlow()
    return GaussianDiffusion.dit(learn_sigma=config.learn_sigma)


__all__ = [
    "GaussianDiffusion",
    "LinearFlow",
    "Objective",
    "PerSampleNoise",
    "StepRandom",
    "linear_betas",
    "make_objective",
    "mix_seed",
    "space_timesteps",
]
