"""The SiT transport: a linear interpolant between noise and data, trained by velocity matching.

SiT's time runs from noise to data: x_t = t * x_1 + (1 - t) * x_0 with x_0 ~ N(0, I) noise
and x_1 the data, so t = 0 is pure noise and t = 1 is data. The network receives the
continuous t in [0, 1] through the same timestep embedder as DiT and predicts the velocity
v = x_1 - x_0. Samplers integrate dx/dt = v(x, t) from t = 0 to 1 on a plain grid (Euler,
Heun), with SiT's adaptive dopri5, or SiT's SDE with its last step (`sit_samplers`).
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from .gaussian import mean_flat, upcast
from .sit_samplers import ODESettings, SDESettings, sample_ode, sample_sde
from .solvers import DEFAULT_SOLVER_STEPS, SOLVERS, SolverSettings, flow_time, make_scheduler, solve

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[], torch.Tensor]


class LinearFlow:
    """Velocity prediction on the linear interpolant.

    Args:
        train_eps: training times are uniform in [train_eps, 1 - train_eps].
    """

    kind = "flow"
    samplers = ("euler", "heun", "sde", "dopri5", "dpm++2m", "unipc")
    default_sampler = "heun"
    default_steps = {"sde": 250, **dict.fromkeys(SOLVERS, DEFAULT_SOLVER_STEPS)}  # SiT's SDE, the solvers; the others 50

    def __init__(self, train_eps: float = 0.0):
        if not 0.0 <= train_eps < 0.5:
            raise ValueError(f"train_eps must be in [0, 0.5), got {train_eps}")
        self.train_eps = train_eps

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
        sde: SDESettings | None = None,
        ode: ODESettings | None = None,
        solver: SolverSettings | None = None,
    ) -> torch.Tensor:
        """Integrate from t = 0 (x = noise()) to t = 1.

        euler, heun: `steps` equal steps (default 50; Heun evaluates the model twice per
        step), the same as SiT's fixed-grid ODE solvers euler and heun2 with num_steps =
        steps + 1 (SiT's grid holds num_steps times); with `solver.flow_shift` s the steps
        follow SD3's shifted flow-matching schedule (diffusers' FlowMatchEulerDiscreteScheduler
        with shift s, as SD3's pipeline sets its sigmas). sde: SiT's SDE sampler with `sde`'s
        options (default 250 model evaluations, the last a 0.04 "mean" step). dopri5: SiT's
        adaptive ODE solver with `ode`'s tolerances on its grid of `steps` times. dpm++2m,
        unipc: diffusers' multistep solvers on flow-matching sigmas (`solver`'s spacing and
        shift; default 20 model evaluations).
        """
        if sampler not in self.samplers:
            raise ValueError(f"unknown flow sampler {sampler!r}; choose one of {self.samplers}")
        steps = self.default_steps.get(sampler, 50) if steps is None else int(steps)
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.velocity(model_fn, x, t)

        with torch.no_grad():
            if sampler == "sde":
                x = sample_sde(velocity, noise, steps, sde or SDESettings())
            elif sampler == "dopri5":
                x = sample_ode(velocity, noise(), steps, ode or ODESettings())
            elif sampler in SOLVERS:
                scheduler = make_scheduler(sampler, solver or SolverSettings(), clip_denoised=clip_denoised)

                def predict(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
                    return -velocity(x, torch.full((x.shape[0],), flow_time(timestep), device=x.device))  # noise - data

                x = solve(scheduler, predict, noise(), steps)
            else:
                shift = solver.flow_shift if solver is not None else 1.0
                x = self._fixed_grid(velocity, noise(), sampler, steps, progress, shift)
        if clip_denoised:
            x = x.clamp(-1, 1)
        return x

    @staticmethod
    def _fixed_grid(velocity, x: torch.Tensor, sampler: str, steps: int, progress: bool, shift: float = 1.0) -> torch.Tensor:
        times = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
        if shift != 1.0:  # SD3's schedule: sigma = 1 - t shifted to s sigma / (1 + (s - 1) sigma)
            sigmas = 1 - times
            times = 1 - shift * sigmas / (1 + (shift - 1) * sigmas)
        for i in tqdm(range(steps), disable=not progress, desc=sampler, leave=False):
            t0, t1 = float(times[i]), float(times[i + 1])
            dt = t1 - t0
            t = torch.full((x.shape[0],), t0, device=x.device)
            v = velocity(x, t)
            if sampler == "euler":
                x = x + dt * v
            else:
                v_next = velocity(x + dt * v, torch.full_like(t, t1))
                x = x + 0.5 * dt * (v + v_next)
        return x
