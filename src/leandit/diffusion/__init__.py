"""Training objectives and samplers: DiT's Gaussian diffusion and SiT's flow transport.

Both expose the same small interface, so training and sampling code never asks which one
it has: `sample_timesteps(n, random)`, `training_losses(model_fn, x0, t, noise)`,
`sample(model_fn, noise, sampler=..., steps=..., ...)`, `samplers`, `default_sampler`.
"""

from __future__ import annotations

from typing import Union

from typing import Any

from .flow import LinearFlow
from .gaussian import GaussianDiffusion, cosine_betas, linear_betas, space_timesteps
from .masked import MaskedDiffusion
from .noise import PerSampleNoise, StepRandom, mix_seed

Objective = Union[GaussianDiffusion, LinearFlow, MaskedDiffusion]


def make_objective(spec: Any) -> Objective:
    """The objective a model was trained with, from its `BackboneSpec` (or a `DiTConfig`):
    anything with `objective` ("diffusion" or "flow") and `learn_sigma`."""
    if spec.objective == "flow":
        return LinearFlow()
    if spec.objective == "diffusion":
        return GaussianDiffusion.dit(learn_sigma=spec.learn_sigma)
    if spec.objective == "masked":  # MAR: its config holds the objective's settings
        return MaskedDiffusion.for_config(spec.objective_config)
    raise ValueError(f"unknown objective {spec.objective!r}: leandit trains and samples 'diffusion' (DiT), 'flow' (SiT) "
                     "and 'masked' (MAR)")


__all__ = [
    "GaussianDiffusion",
    "LinearFlow",
    "MaskedDiffusion",
    "Objective",
    "PerSampleNoise",
    "StepRandom",
    "cosine_betas",
    "linear_betas",
    "make_objective",
    "mix_seed",
    "space_timesteps",
]
