"""Classifier-free guidance for any denoiser callable `model(x, t, cond)`.

A free function rather than a model method, so that a wrapper around a whole model (a
router, a diffusers adapter) is guided through its own forward and not bypassed.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def classifier_free_guidance(
    model: Denoiser,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: Any,
    *,
    scale: float,
    channels: int,
    null_class: int | None = None,
    unconditional: Any = None,
) -> torch.Tensor:
    """uncond + scale * (cond - uncond) on the first `channels` output channels.

    Runs the conditional and unconditional halves as one batch of 2N. The unconditional input
    is `unconditional` (a batch like `cond`: the empty prompt's embedding, say) or, for class
    labels, the class `null_class`. The channels not guided (the original DiT/SiT guide 3 of
    4 latent channels) and any learned-variance channels come from the conditional half, as
    in the original sampler.
    """
    from ..backbones.conditioning import cond_cat

    n = x.shape[0]
    if unconditional is None:
        if null_class is None:
            raise ValueError("guidance needs the unconditional input: pass null_class or unconditional")
        unconditional = torch.full_like(cond, null_class)
    out = model(torch.cat([x, x]), torch.cat([t, t]), cond_cat([cond, unconditional]))  # (2N, C_out, H, W)
    cond_out, uncond_out = out[:n], out[n:]
    guided = uncond_out[:, :channels] + scale * (cond_out[:, :channels] - uncond_out[:, :channels])  # (N, k, H, W)
    return torch.cat([guided, cond_out[:, channels:]], dim=1)  # (N, C_out, H, W)
