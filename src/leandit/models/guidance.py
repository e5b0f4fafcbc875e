"""Classifier-free guidance for any denoiser callable `model(x, t, y)`.

A free function rather than a model method, so that a wrapper around a whole model (a
router, a diffusers adapter) is guided through its own forward and not bypassed.
"""

from __future__ import annotations

from typing import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def classifier_free_guidance(
    model: Denoiser,
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    *,
    scale: float,
    null_class: int,
    channels: int,
) -> torch.Tensor:
    """uncond + scale * (cond - uncond) on the first `channels` output channels.

    Runs the conditional and null-class halves as one batch of 2N. The channels not guided
    (the original DiT/SiT guide 3 of 4 latent channels) and any learned-variance channels
    come from the conditional half, as in the original sampler.
    """
    n = x.shape[0]
    null = torch.full_like(y, null_class)
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))  # (2N, C_out, H, W)
    cond, uncond = out[:n], out[n:]
    guided = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])  # (N, k, H, W)
    return torch.cat([guided, cond[:, channels:]], dim=1)  # (N, C_out, H, W)
