"""SiT's samplers for its linear velocity interpolant, as SiT's `transport` defines them, so a
user reproduces SiT's numbers with leandit.

On x_t = t x_1 + (1 - t) x_0 (t = 0 noise, t = 1 data) a velocity model v gives the score
s(x, t) = (t v - x) / (1 - t). SiT's SDE integrates

    dx = [v + w(t) s] dt + sqrt(2 w(t)) dW

by Euler-Maruyama on `steps` equally spaced float32 times from t0 to t1 = 1 - last_step_size
(steps - 1 steps), then takes one last step of that size: "mean" (the drift without noise),
"tweedie" (the posterior mean x / t + (1 - t)^2 / t * s), "euler" (the velocity alone) or
"none" (t1 = 1, no last step). Its model evaluations are `steps` in all. w(t) is SiT's
diffusion form times `norm`: "sigma" (1 - t, SiT's sample.py default), "SBDM" ((1 - t) / t,
the score-matching SDE's, infinite at t = 0: it needs `sample_eps` > 0), "constant",
"linear" (1 - t), "decreasing" ((norm cos(pi t) + 1)^2 / 4) or "increasing-decreasing"
(sin(pi t)^2). SiT itself forces sample_eps to 0 for velocity models, so its SBDM form is
infinite at the first step; leandit takes a sample_eps for it. SiT's reported FIDs: 250 steps, sigma,
norm 1, "mean", 0.04.

The ODE dx/dt = v runs through torchdiffeq on SiT's grid of `steps` float32 times from 0 to 1
(an adaptive solver such as dopri5 chooses its own steps to meet atol and rtol, SiT's 1e-6
and 1e-3, and interpolates onto the grid).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t (N,)) -> v
NoiseFn = Callable[[], torch.Tensor]

SDE_FORMS = ("sigma", "SBDM", "constant", "linear", "decreasing", "increasing-decreasing")
LAST_STEPS = ("mean", "tweedie", "euler", "none")
ODE_METHODS = ("dopri5", "dopri8", "bosh3", "adaptive_heun", "euler", "midpoint", "heun2", "rk4")


@dataclass(frozen=True)
class SDESettings:
    """SiT's SDE sampler options; the defaults are its sample.py's."""

    form: str = "sigma"
    norm: float = 1.0
    last_step: str = "mean"
    last_step_size: float = 0.04
    sample_eps: float = 0.0

    def __post_init__(self) -> None:
        if self.form not in SDE_FORMS:
            raise ValueError(f"unknown SDE diffusion form {self.form!r}; choose one of {', '.join(SDE_FORMS)}")
        if self.last_step not in LAST_STEPS:
            raise ValueError(f"unknown last step {self.last_step!r}; choose one of {', '.join(LAST_STEPS)}")
        if self.last_step != "none" and not 0 < self.last_step_size < 1:
            raise ValueError(f"the last step's size must be in (0, 1), got {self.last_step_size}")
        if not 0 <= self.sample_eps < 0.5:
            raise ValueError(f"sample_eps must be in [0, 0.5), got {self.sample_eps}")
        if self.form == "SBDM" and self.sample_eps == 0:
            raise ValueError("the SBDM diffusion (1 - t) / t is infinite at t = 0: give a sample_eps (e.g. 0.001) "
                             "or use the sigma form")

    def record(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ODESettings:
    """The ODE solver and its tolerances (SiT's defaults: dopri5, 1e-6, 1e-3)."""

    method: str = "dopri5"
    atol: float = 1e-6
    rtol: float = 1e-3

    def __post_init__(self) -> None:
        if self.method not in ODE_METHODS:
            raise ValueError(f"unknown ODE method {self.method!r}; choose one of {', '.join(ODE_METHODS)}")
        if not (self.atol > 0 and self.rtol > 0):
            raise ValueError(f"atol and rtol must be positive, got {self.atol:g} and {self.rtol:g}")

    def record(self) -> dict[str, Any]:
        return asdict(self)


def diffusion_coefficient(form: str, norm: float, t: torch.Tensor) -> torch.Tensor:
    """w(t) of SiT's SDE (its ICPlan.compute_diffusion)."""
    if form == "constant":
        return torch.full_like(t, norm)
    if form == "SBDM":
        return norm * (1 - t) / t  # ICPlan's drift variance: (1/t) (1 - t)^2 + (1 - t)
    if form in ("sigma", "linear"):
        return norm * (1 - t)
    if form == "decreasing":
        return 0.25 * (norm * torch.cos(math.pi * t) + 1) ** 2
    return norm * torch.sin(math.pi * t) ** 2  # increasing-decreasing


def score(v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The score of p_t from the velocity, (t v - x) / (1 - t), with t broadcast like x; the
    variance written as SiT's ICPlan does, (1 - t)^2 + t (1 - t), for its float32 rounding."""
    return (t * v - x) / ((1 - t) ** 2 + t * (1 - t))


def sample_sde(velocity: VelocityFn, noise: NoiseFn, steps: int, settings: SDESettings = SDESettings()) -> torch.Tensor:
    """SiT's SDE sampler from x = noise() at t0; `steps` model evaluations (see the module)."""
    if steps < 2:
        raise ValueError(f"SiT's SDE needs at least 2 steps (one Euler-Maruyama step and the last), got {steps}")
    s = settings
    size = 0.0 if s.last_step == "none" else s.last_step_size
    t0 = s.sample_eps if s.form == "SBDM" else 0.0
    t1 = 1 - size if size > 0 else 1 - s.sample_eps
    grid = torch.linspace(t0, t1, steps)  # float32, as SiT's
    dt = grid[1] - grid[0]
    x = noise()

    def drift_and_w(x: torch.Tensor, t: float | torch.Tensor):
        tt = torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)
        v = velocity(x, tt)
        tb = tt.reshape(-1, *([1] * (x.dim() - 1)))
        w = diffusion_coefficient(s.form, s.norm, tb)
        return v, v + w * score(v, x, tb), w, tb

    for t in grid[:-1]:
        _, drift, w, _ = drift_and_w(x, t)
        dw = noise() * torch.sqrt(dt).to(x.device)
        x = x + drift * dt.to(x.device) + torch.sqrt(2 * w) * dw
    if s.last_step == "none":
        return x
    v, drift, _, tb = drift_and_w(x, t1)
    if s.last_step == "mean":
        return x + drift * size
    if s.last_step == "euler":
        return x + v * size
    return x / tb + (1 - tb) ** 2 / tb * score(v, x, tb)  # tweedie: E[x_1 | x_t]


def sample_ode(velocity: VelocityFn, x: torch.Tensor, steps: int, settings: ODESettings = ODESettings()) -> torch.Tensor:
    """dx/dt = v from t = 0 to 1 through torchdiffeq on SiT's grid of `steps` times."""
    from torchdiffeq import odeint  # only when an ODE sampler runs

    if steps < 2:
        raise ValueError(f"the ODE grid needs at least 2 times, got {steps}")

    def rhs(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return velocity(x, torch.ones(x.shape[0], device=x.device, dtype=x.dtype) * t)

    grid = torch.linspace(0.0, 1.0, steps).to(x.device)
    return odeint(rhs, x, grid, method=settings.method, atol=settings.atol, rtol=settings.rtol)[-1]
