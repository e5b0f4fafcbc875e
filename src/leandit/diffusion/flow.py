"""The SiT transport: a linear interpolant between noise and data, trained by velocity matching.

SiT's time runs from noise to data: x_t = t * x_1 + (1 - t) * x_0 with x_0 ~ N(0, I) noise
and x_1 the data, so t = 0 is pure noise and t = 1 is data. The network receives the
continuous t in [0, 1] through the same timestep embedder as DiT and predicts the velocity
v = x_1 - x_0. Samplers integrate dx/dt = v(x, t) from t = 0 to 1 (Euler, Heun) or the
matching SDE with a diffusion term that vanishes at the data end.
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from .gaussian import mean_flat, upcast

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[], torch.Tensor]


class LinearFlow:
    """Velocity prediction on the linear interpolant.

    Args:
        train_eps: training times are uniform in [train_eps, 1 - train_eps].
        sde_diffusion: scale g0 of the SDE sampler's diffusion g(t)^2 = g0 * (1 - t); the
            default 2 is SiT's default ("sigma" form, norm 1).
    """

    kind = "flow"
    samplers = ("euler", "heun", "sde")
    default_sampler = "heun"

    def __init__(self, train_eps: float = 0.0, sde_diffusion: float = 2.0):
        if not 0.0 <= train_eps < 0.5:
            raise ValueError(f"train_eps must be in [0, 0.5), got {train_eps}")
        self.train_eps = train_eps
        self.sde_diffusion = sde_diffusion

    def sample_timesteps(self, n: int, random) -> torch.Tensor:
        return self.train_eps + (1 - 2 * self.train_eps) * random.rand()

    def interpolate(self, x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor):
        """(x_t, target velocity) for data x1, noise x0 and times t (N,)."""
        tt = t.reshape(-1, *([1] * (x1.dim() - 1)))
        return tt * x1 + (1 - tt) * x0, x1 - x0

    def velocity(self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # SiT checkpoints keep DiT's learned-sigma channels; the velocity is the first half.
        return model_fn(x, t)[:, : x.shape[1]]

    def training_losses(
        self, model_fn: ModelFn, x1: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        xt, target = self.interpolate(x1, noise, t)
        out = model_fn(xt, t)
        loss = mean_flat((out[:, : x1.shape[1]] - target) ** 2)
        return {"loss": loss, "mse": loss, "model_output": out, "xt": xt}

    def distillation_losses(
        self, student_output: torch.Tensor, teacher_output: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-sample logits-KD term: the MSE between the two predicted velocities (SiT's
        unused learned-sigma channels are left out)."""
        c = xt.shape[1]
        student = upcast(student_output[:, :c])
        mse = mean_flat((student - upcast(teacher_output[:, :c].detach()).to(student.dtype)) ** 2)
        return {"kd": mse, "kd_mse": mse}

    def sample(
        self,
        model_fn: ModelFn,
        noise: NoiseFn,
        *,
        sampler: str = "heun",
        steps: int | None = None,
        clip_denoised: bool = False,
        progress: bool = False,
    ) -> torch.Tensor:
        """Integrate from t = 0 (x = noise()) to t = 1 in `steps` equal steps (default 50).

        Heun uses two model evaluations per step. The SDE sampler (Euler-Maruyama) adds
        g(t) dW with g^2 = g0 (1 - t) and the matching score correction to the drift,
        v + g^2/2 * score, where score = -(x - t v) / (1 - t) for this interpolant; the
        product stays finite up to t = 1.
        """
        if sampler not in self.samplers:
            raise ValueError(f"unknown flow sampler {sampler!r}; choose one of {self.samplers}")
        steps = 50 if steps is None else int(steps)
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        x = noise()
        times = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
        for i in tqdm(range(steps), disable=not progress, desc=sampler, leave=False):
            t0, t1 = float(times[i]), float(times[i + 1])
            dt = t1 - t0
            t = torch.full((x.shape[0],), t0, device=x.device)
            with torch.no_grad():
                v = self.velocity(model_fn, x, t)
                if sampler == "euler":
                    x = x + dt * v
                elif sampler == "heun":
                    x_next = x + dt * v
                    v_next = self.velocity(model_fn, x_next, torch.full_like(t, t1))
                    x = x + 0.5 * dt * (v + v_next)
                else:
                    drift = v - 0.5 * self.sde_diffusion * (x - t0 * v)
                    x = x + dt * drift
                    if i < steps - 1:  # the last step ends on the data: no new noise
                        x = x + (self.sde_diffusion * (1 - t0) * dt) ** 0.5 * noise()
        if clip_denoised:
            x = x.clamp(-1, 1)
        return x
