"""Fine-tuning an inpainting variant (`leandit.models.inpaint.InpaintModel`) on its own objective.

Each image gets a mask drawn from the step's randomness (after the noise, timesteps and label
drops that the plain job draws), so a resumed run and a run on K processes see the same masks
as one uninterrupted run. The model sees [x0 * (1 - mask), mask] beside x_t.

The loss is the model's ordinary diffusion (or flow) loss on the whole image, not on the
unknown region only: at sampling the known region of x_t is what the model's own predictions
made of it, and it stays on the trajectory the model was trained on only if the model keeps
denoising it correctly (an unknown-only loss leaves the known region's prediction free to
drift, and later steps then see inputs unlike any in training). The whole-image loss also
needs no masked variant of any objective (learned-sigma VB term, SiT velocity) and starts
exactly at the base model's loss. The known pixels are pasted back once the sample is done.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..backbones import Conditioning, backbone
from ..diffusion import Objective, StepRandom
from ..models.inpaint import InpaintModel, MaskSpec, inpaint_layer
from .denoising import DenoisingJob


class InpaintingJob(DenoisingJob):
    """The denoising job with a known image and a mask per image.

    Args:
        model: an InpaintModel (possibly inside other registered wrappers).
        masks: the kinds of mask to draw (`parse_masks`).
    """

    def __init__(self, model: nn.Module, objective: Objective, masks: MaskSpec, class_dropout_prob: float | None = None,
                 conditioning: Conditioning | None = None):
        if backbone(model).spec.objective == "masked":
            raise ValueError("inpainting fine-tuning does not apply to MAR: its extra input channels go through a DiT's "
                             "patch embedding at a timestep, and MAR takes none (it already predicts unknown tokens from known ones)")
        super().__init__(model, objective, class_dropout_prob, conditioning)
        layer = inpaint_layer(self.module)
        if layer is None:
            raise ValueError("the inpainting job trains an InpaintModel: wrap the model with InpaintModel(model) first")
        self.inpaint: InpaintModel = layer
        self.masks = masks

    def compute_loss(self, module: nn.Module, batch: Any, random: StepRandom) -> tuple[torch.Tensor, dict[str, Any]]:
        x0, t, noise, y = self.draw_inputs(batch, random)
        mask = self.masks.draw(random.rand(MaskSpec.UNIFORMS)).to(x0.device)  # (N, 1, H, W), 1 = unknown
        # The context sits on the InpaintModel itself, so it holds through DDP and any wrapper
        # around it (a router's forward takes the backbone's arguments only).
        with self.inpaint.inpainting(x0, mask):
            terms = self.objective.training_losses(lambda x, tt: self.predict(module, x, tt, y), x0, t, noise)
        logs = {"mse": terms["mse"].mean(), "unknown": mask.mean()}
        if "vb" in terms:
            logs["vb"] = terms["vb"].mean()
        return terms["loss"].mean(), logs


__all__ = ["InpaintingJob"]
