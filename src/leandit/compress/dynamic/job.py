"""Fine-tuning a DyDiT model toward a MAC target on the one training loop.

    loss = recovery mix (its own diffusion loss; optionally KD / masked RepKD from the dense
           model) + w * (batch mean of dynamic / dense MACs - lambda_step)^2
           (+ the dense model's own diffusion loss during the first stage)

lambda_step anneals linearly from 1 to the target over the warm-up. MACs come from the actual
head, group and token decisions of each image (`MacCounter`). Timesteps are stratified by
global batch index into regions (four of 250 steps by default), so every region of the
trajectory, where the routers choose different widths, is in every batch.

DDP: the batch mean in the square is the global batch's (all-reduced), and the term is
written so that its gradient per image is what one process would give, so K processes train
exactly like one.
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
from ...train.distributed import all_reduce_
from ...train.schedules import linear_anneal
from ..recovery import RecoveryJob, RecoverySettings
from .model import DynamicModel


@dataclass
class DynamicTraining:
    """The MAC target and its schedule (defaults: the DyDiT paper's).

    Args:
        target: lambda, the dynamic model's MACs as a fraction of the dense model's, in (0, 1].
        flops_weight: w of the MAC loss (the paper's 1; its released script uses 2).
        target_warmup: steps over which the target anneals from 1.0 to `target`.
        dense_loss_steps: first-stage steps that add the unmasked model's own loss.
        regions: timestep regions stratified over the batch (1 = uniform timesteps).
        router_lr: learning rate of the routers (None: the loop's). Their biases start 15-35
            logits away from skipping anything and AdamW moves a bias by about its learning
            rate per step, so a run much shorter than the paper's 150k steps needs a larger one.
    """

    target: float
    flops_weight: float = 1.0
    target_warmup: int = 0
    dense_loss_steps: int = 0
    regions: int = 4
    router_lr: float | None = None

    def __post_init__(self) -> None:
        if self.router_lr is not None and not (math.isfinite(self.router_lr) and self.router_lr > 0):
            raise ValueError(f"--router-lr must be a positive number, got {self.router_lr}")
        if not (0 < self.target <= 1):  # also refuses NaN
            raise ValueError(f"--target is the fraction of the dense model's MACs to keep, in (0, 1]; got {self.target}")
        if not (math.isfinite(self.flops_weight) and self.flops_weight > 0):
            raise ValueError(f"--flops-weight must be a positive number, got {self.flops_weight}")
        if self.target_warmup < 0 or self.dense_loss_steps < 0:
            raise ValueError("--target-warmup and --dense-loss-steps must be 0 or more")
        if self.regions < 1:
            raise ValueError(f"--regions must be at least 1, got {self.regions}")


class DynamicJob(RecoveryJob):
    """Train a `DynamicModel` (routers and weights together) toward `training.target`."""

    def __init__(
        self,
        model: DynamicModel,
        training: DynamicTraining,
        recovery: RecoverySettings,
        teacher: nn.Module | None = None,
        teacher_layers: Sequence[int] | None = None,
        teacher_dtype: torch.dtype | None = None,
        conditioning: Conditioning | None = None,
    ):
        if not isinstance(model, DynamicModel):
            raise TypeError("DynamicJob trains a DynamicModel")
        minimum = model.macs.minimum_ratio()
        if training.target < minimum:
            raise ValueError(
                f"--target {training.target:g} is below what this model can reach ({minimum:.3f}: head 0 and MLP group 0 of "
                f"every block{'' if model.settings.tokens else ' at every token'} plus the parts no router controls); "
                f"choose a target of at least {math.ceil(minimum * 100) / 100:g}"
            )
        super().__init__(model, teacher, recovery, teacher_layers, teacher_dtype, conditioning)
        self.training = training
        self.current_target = 1.0
        self.use_dense_loss = False
        self._noise: torch.Tensor | None = None
        self._last_inputs: tuple[Any, ...] = ()

    method_name = "DyDiT"

    def method_state(self) -> dict[str, dict[str, Any]]:
        return {"dynamic": asdict(self.training), "dynamic_settings": asdict(self.module.settings)}

    def parameter_groups(self) -> list[dict[str, Any]]:
        # Weights first: the loop logs the first group's learning rate.
        routers = {id(p) for p in self.module.router_parameters()}
        weights = [p for p in self.module.parameters() if p.requires_grad and id(p) not in routers]
        router_group: dict[str, Any] = {"params": [p for p in self.module.router_parameters() if p.requires_grad], "name": "routers"}
        if self.training.router_lr is not None:
            router_group["lr"] = self.training.router_lr
        return [{"params": weights, "name": "weights"}, router_group]

    def on_step_start(self, step: int, total_steps: int) -> None:
        super().on_step_start(step, total_steps)
        t = self.training
        self.current_target = linear_anneal(step, t.target_warmup + 1, 1.0, t.target) if t.target_warmup else t.target
        self.use_dense_loss = step < t.dense_loss_steps

    def draw_inputs(self, batch: Any, random: StepRandom) -> tuple[Any, ...]:
        x0, t, noise, y = super().draw_inputs(batch, random)
        self._noise = random.rand(self.module.noise_size)  # (N, K) uniforms for every router decision
        if self.training.regions > 1:
            t = self._stratified(random, t)
        self._last_inputs = (x0, t, noise, y)
        return x0, t, noise, y

    def _stratified(self, random: StepRandom, t: torch.Tensor) -> torch.Tensor:
        return stratified_timesteps(random, t, self.training.regions, self.objective)

    def predict(self, module: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        from ...backbones import backbone

        return backbone(self.module).predict(x, t, cond, via=module, router_noise=self._noise)

    def compute_loss(self, module: nn.Module, batch: Any, random: StepRandom) -> tuple[torch.Tensor, dict[str, Any]]:
        loss, logs = super().compute_loss(module, batch, random)
        ratio = self.module.macs.ratio(self.module.last_macs)  # (N,) float64, differentiable through the masks
        local = ratio.mean()
        total = all_reduce_(torch.stack([local.detach() * ratio.shape[0], ratio.new_tensor(float(ratio.shape[0]))]))
        batch_mean = total[0] / total[1]  # the global batch's mean ratio
        w, target = self.training.flops_weight, self.current_target
        # Value w (mean - target)^2; gradient per image 2 w (mean - target) / N_global, as on one
        # process (DDP averages the K processes' gradients, each of which sees N_global / K images).
        flops = w * (batch_mean - target) ** 2 + 2 * w * (batch_mean - target) * (local - local.detach())
        loss = loss + flops.to(loss.dtype)
        logs.update(macs_ratio=batch_mean, target=target, flops_loss=w * (batch_mean - target) ** 2)
        if self.use_dense_loss:
            x0, t, noise, y = self._last_inputs
            terms = self.objective.training_losses(
                lambda x, tt: self._predict_dense(module, x, tt, y), x0, t, noise)
            dense = terms["loss"].mean()
            loss = loss + dense
            logs["dense_diffusion"] = dense
        return loss, logs

    def _predict_dense(self, module: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        from ...backbones import backbone

        return backbone(self.module).predict(x, t, cond, via=module, dense=True)
