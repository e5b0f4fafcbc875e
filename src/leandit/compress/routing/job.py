"""Fine-tuning a routed model toward a compression target on the one training loop.

    loss = recovery mix (its own diffusion loss; optionally KD / masked RepKD from the dense
           model) + w * budget
    budget = (mean kept ratio - (1 - target))^2                          ("ratio", the paper's)
           | (routed / dense MACs of the ratios, mean over regions - (1 - target))^2   ("macs")

Routers, ratios and the backbone's weights train together. The budget is a function of the
ratio parameters alone (not of the batch), so every process computes the same value and DDP
needs nothing special; the kept tokens differ per image, but every block's weights and router
are used by every image, so no parameter goes unused. Timesteps are stratified into the
regions by global batch index, so every region's ratios see images in every batch. After each
step the ratios are projected back into [1 / bins, 1] (the forward also clamps them, with the
gradient passing), so they stay in range without their gradient being cut.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ...backbones import Conditioning
from ...diffusion import StepRandom
from ...train.denoising import stratified_timesteps
from ..recovery import RecoveryJob, RecoverySettings
from .model import RoutedModel
from .ratios import capacity, mac_budget_loss, ratio_budget_loss

BUDGETS = ("ratio", "macs")


@dataclass
class RoutingTraining:
    """The compression target and its loss.

    Args:
        target: the fraction of the computation to remove, in (0, 1): of the tokens the blocks
            run on ("ratio" budget) or of the MACs ("macs").
        budget: "ratio" (the paper's mean kept ratio) or "macs" (attention's quadratic cost
            and the fixed parts counted).
        budget_weight: w of the budget loss.
        router_lr: learning rate of routers and ratios (None: the loop's). The ratios start at
            1 and AdamW moves them by about the learning rate per step.
    """

    target: float
    budget: str = "ratio"
    budget_weight: float = 1.0
    router_lr: float | None = None

    def __post_init__(self) -> None:
        if not (0 < self.target < 1):  # also refuses NaN
            raise ValueError(f"--target is the fraction of the computation to remove, in (0, 1) (0.3 = 30 % less); got {self.target}")
        if self.budget not in BUDGETS:
            raise ValueError(f"--budget must be one of {', '.join(BUDGETS)}, got {self.budget!r}")
        if not (math.isfinite(self.budget_weight) and self.budget_weight > 0):
            raise ValueError(f"--budget-weight must be a positive number, got {self.budget_weight}")
        if self.router_lr is not None and not (math.isfinite(self.router_lr) and self.router_lr > 0):
            raise ValueError(f"--router-lr must be a positive number, got {self.router_lr}")


class RouteJob(RecoveryJob):
    """Train a `RoutedModel` (routers, ratios and weights together) toward `training.target`."""

    method_name = "routing"

    def __init__(
        self,
        model: RoutedModel,
        training: RoutingTraining,
        recovery: RecoverySettings,
        teacher: nn.Module | None = None,
        teacher_layers: Sequence[int] | None = None,
        teacher_dtype: torch.dtype | None = None,
        conditioning: Conditioning | None = None,
        masks: Any = None,
    ):
        """`masks`: for an inpainting model, the `MaskSpec` its steps draw (as `leandit train
        --inpaint` does), so routing is fine-tuned on the task the model does."""
        if not isinstance(model, RoutedModel):
            raise TypeError("RouteJob trains a RoutedModel")
        if model.schedule is not None:
            raise ValueError("this routed model is frozen to a schedule: unfreeze it (set_schedule(None)) to train its ratios")
        floor = self.reachable(model, training.budget)
        if 1 - training.target < floor - 1e-9:
            raise ValueError(
                f"--target {training.target:g} removes more than this model can ({1 - floor:.3f} of the "
                f"{'MACs' if training.budget == 'macs' else 'tokens'} at ratio 1/{model.settings.bins} in every block); "
                f"choose a target of at most {math.floor((1 - floor) * 100) / 100:g}")
        super().__init__(model, teacher, recovery, teacher_layers, teacher_dtype, conditioning)
        self.training = training
        self.masks = masks
        self._inpaint = None
        if masks is not None:
            from ...models.inpaint import inpaint_layer

            self._inpaint = inpaint_layer(model)
            if self._inpaint is None:
                raise ValueError("inpainting masks were given for a model that is not an inpainting variant")
            if teacher is not None:
                raise ValueError("an inpainting model is routed on its own loss (--mix plain): the teacher would not see "
                                 "the known image")
        self._context = None

    @staticmethod
    def reachable(model: RoutedModel, budget: str) -> float:
        """The least kept fraction a budget can reach: every block at the lowest bin."""
        bins = model.settings.bins
        if budget == "ratio":
            return 1.0 / bins
        k = torch.full((model.depth,), capacity(1, bins, model.num_tokens))
        return float(model.macs.ratio(model.macs.total(k)))

    def method_state(self) -> dict[str, dict[str, Any]]:
        state = {"routing": asdict(self.training), "routing_settings": asdict(self.module.settings)}
        if self.masks is not None:
            state["inpainting"] = {"masks": self.masks.text}
        return state

    def parameter_groups(self) -> list[dict[str, Any]]:
        # Weights first: the loop logs the first group's learning rate.
        routers = {id(p) for p in self.module.router_parameters()}
        weights = [p for p in self.module.parameters() if p.requires_grad and id(p) not in routers]
        group: dict[str, Any] = {"params": [p for p in self.module.router_parameters() if p.requires_grad],
                                 "name": "routers", "weight_decay": 0.0}
        if self.training.router_lr is not None:
            group["lr"] = self.training.router_lr
        return [{"params": weights, "name": "weights"}, group]

    def draw_inputs(self, batch: Any, random: StepRandom) -> tuple[Any, ...]:
        x0, t, noise, y = super().draw_inputs(batch, random)
        regions = self.module.settings.regions
        if regions > 1:
            t = stratified_timesteps(random, t, regions, self.objective)
        if self.masks is not None:  # after everything else the step draws, as the inpainting job does
            self._context = (x0, self.masks.draw(random.rand(self.masks.UNIFORMS)).to(x0.device))
        return x0, t, noise, y

    def predict(self, module: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        if self._context is None:
            return super().predict(module, x, t, cond)
        with self._inpaint.inpainting(*self._context):
            return super().predict(module, x, t, cond)

    def budget(self) -> tuple[torch.Tensor, dict[str, Any]]:
        """The budget loss (unweighted) and what to log."""
        model: RoutedModel = self.module
        kept = model.kept_ratios()
        macs = model.interpolated_mac_ratio()
        target = self.training.target
        loss = ratio_budget_loss(kept, target) if self.training.budget == "ratio" else mac_budget_loss(macs, target)
        return loss, {"kept_ratio": kept.mean().detach(), "macs_ratio": macs.detach()}

    def compute_loss(self, module: nn.Module, batch: Any, random: StepRandom) -> tuple[torch.Tensor, dict[str, Any]]:
        loss, logs = super().compute_loss(module, batch, random)
        budget, budget_logs = self.budget()
        loss = loss + (self.training.budget_weight * budget).to(loss.dtype)
        logs.update(budget_loss=budget.detach(), **budget_logs)
        return loss, logs

    def on_step_end(self, step: int, module: nn.Module, ema_module: nn.Module | None) -> dict[str, Any]:
        logs = super().on_step_end(step, module, ema_module)
        low = 1.0 / self.module.settings.bins
        with torch.no_grad():
            self.module.ratios.clamp_(low, 1.0)
            if ema_module is not None:
                ema_module.ratios.clamp_(low, 1.0)
        return logs
