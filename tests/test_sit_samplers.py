"""SiT's samplers (its SDE with the last step, dopri5 and the fixed-grid ODEs) against
independent computations on an analytic velocity field: Gaussian data N(mu, s^2), whose
velocity, score and transport map x(1) = mu + s x(0) are known in closed form."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import leandit
from leandit.diffusion import LinearFlow
from leandit.diffusion.sit_samplers import ODESettings, SDESettings

from conftest import RecordingNoise, tiny_model
from test_flow import MU, S, gaussian_score, gaussian_velocity, quantiles


def w_of(form: str, norm: float, t: float) -> float:
    if form == "SBDM":
        return norm * (1 - t) / t
    return {"sigma": norm * (1 - t), "linear": norm * (1 - t), "constant": norm,
            "decreasing": 0.25 * (norm * math.cos(math.pi * t) + 1) ** 2,
            "increasing-decreasing": norm * math.sin(math.pi * t) ** 2}[form]


def reference_sit_sde(calls, steps, settings: SDESettings):
    """SiT's sampler written out from its definition, in float64 with the closed-form score."""
    size = 0.0 if settings.last_step == "none" else settings.last_step_size
    t0 = settings.sample_eps if settings.form == "SBDM" else 0.0
    t1 = 1 - size if size else 1 - settings.sample_eps
    times = np.linspace(t0, t1, steps, dtype=np.float32).astype(np.float64)  # SiT's float32 grid
    dt = float(np.float32(times[1] - times[0]))

    def velocity(x, t):
        d = t * t * S * S + (1 - t) ** 2
        return MU + t * S * S * (x - t * MU) / d - (1 - t) * (x - t * MU) / d

    x = calls[0]
    for i, t in enumerate(times[:-1]):
        w = w_of(settings.form, settings.norm, t)
        drift = velocity(x, t) + w * gaussian_score(x, t, MU, S)
        x = x + drift * dt + math.sqrt(2 * w) * math.sqrt(dt) * calls[1 + i]
    t = float(np.float32(t1))
    if settings.last_step == "mean":
        x = x + (velocity(x, t) + w_of(settings.form, settings.norm, t) * gaussian_score(x, t, MU, S)) * size
    elif settings.last_step == "euler":
        x = x + velocity(x, t) * size
    elif settings.last_step == "tweedie":
        x = x / t + (1 - t) ** 2 / t * gaussian_score(x, t, MU, S)
    return x


@pytest.mark.parametrize("settings", [
    SDESettings(),  # SiT's defaults: sigma, norm 1, mean, 0.04
    SDESettings(last_step="tweedie"), SDESettings(last_step="euler", last_step_size=0.1), SDESettings(last_step="none"),
    SDESettings(form="decreasing", norm=0.5), SDESettings(form="increasing-decreasing"), SDESettings(form="constant", norm=0.3),
    SDESettings(form="SBDM", sample_eps=1e-3),
], ids=lambda s: f"{s.form}-{s.norm}-{s.last_step}")
def test_the_sde_is_sits_euler_maruyama_and_last_step(settings):
    noise = RecordingNoise((64, 1), 3)
    flow = LinearFlow()
    x = flow.sample(gaussian_velocity(MU, S), noise, sampler="sde", steps=30, sde=settings)
    assert len(noise.calls) == 30  # x(t0) and one draw per Euler-Maruyama step (steps - 1)
    np.testing.assert_allclose(x.numpy(), reference_sit_sde(noise.calls, 30, settings), rtol=1e-6, atol=1e-7)


def test_the_default_sde_draws_the_data_distribution():
    """250 steps of SiT's default SDE with the exact velocity give N(mu, s^2) up to the
    discretisation (the last 0.04 is one deterministic step): 5 standard errors of 20,000."""
    n = 20_000
    x = LinearFlow().sample(gaussian_velocity(MU, S), RecordingNoise((n, 1), 4, record=False), sampler="sde").numpy().ravel()
    assert abs(x.mean() - MU) < 5 * S / math.sqrt(n)
    assert abs(x.std() - S) < 0.01 + 5 * S / math.sqrt(2 * n)


def test_dopri5_meets_its_tolerances_on_the_exact_transport_map():
    z = quantiles(501).to(torch.float64)
    exact = MU + S * z  # the ODE's flow map for Gaussian data
    evaluations = []

    def counted(x, t):
        evaluations.append(1)
        return gaussian_velocity(MU, S)(x, t)

    flow = LinearFlow()
    default = flow.sample(counted, lambda: z.clone(), sampler="dopri5")  # SiT's atol 1e-6, rtol 1e-3
    # The tolerances bound each step's local error; the global error is a few times rtol.
    assert float((default - exact).abs().max()) < 1e-2
    assert len(evaluations) < 50  # adaptive: 20 evaluations here, fewer than SiT's 50-point grid
    errors = [float((flow.sample(gaussian_velocity(MU, S), lambda: z.clone(), sampler="dopri5",
                                 ode=ODESettings(atol=tol * 1e-3, rtol=tol)) - exact).abs().max()) for tol in (1e-3, 1e-6, 1e-10)]
    assert errors[1] < errors[0] * 1e-2 and errors[2] < 1e-8  # converges as the tolerances shrink


@pytest.mark.parametrize("ours, theirs", [("euler", "euler"), ("heun", "heun2")])
def test_the_plain_grid_samplers_are_torchdiffeqs_fixed_grid_solvers(ours, theirs):
    """`--sampler euler/heun --steps N` is SiT's ODE euler/heun2 with num_steps N + 1."""
    z = quantiles(101).to(torch.float64)
    flow = LinearFlow()
    a = flow.sample(gaussian_velocity(MU, S), lambda: z.clone(), sampler=ours, steps=12)
    b = flow.sample(gaussian_velocity(MU, S), lambda: z.clone(), sampler="dopri5", steps=13, ode=ODESettings(method=theirs))
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="infinite at t = 0"):
        SDESettings(form="SBDM")
    with pytest.raises(ValueError, match="unknown SDE diffusion form"):
        SDESettings(form="sbdm")
    with pytest.raises(ValueError, match="last step's size"):
        SDESettings(last_step_size=0.0)
    with pytest.raises(ValueError, match="at least 2 steps"):
        LinearFlow().sample(gaussian_velocity(MU, S), RecordingNoise((2, 1), 0), sampler="sde", steps=1)


def _one_line_error(argv, capsys) -> str:
    from leandit.cli import main

    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


def test_sample_records_sits_sampler_settings_and_refuses_other_ones(tmp_path, capsys):
    from leandit.cli import main

    torch.manual_seed(0)
    folder = tmp_path / "sit"
    leandit.save_model(tiny_model(objective="flow"), folder)
    out = tmp_path / "s"
    base = ["sample", str(folder), "--out", str(out), "--device", "cpu", "--quiet", "--num-samples", "2", "--steps", "6"]
    assert main([*base, "--sampler", "sde", "--last-step", "tweedie"]) == 0
    settings = json.loads((out / "sampling.json").read_text())
    assert settings["sampler"] == "sde" and settings["sde"] == SDESettings(last_step="tweedie").record()
    capsys.readouterr()
    assert "--sde was" in _one_line_error([*base, "--sampler", "sde"], capsys)  # another last step: not mixed in
    assert "--atol apply to --sampler dopri5, not sde" in _one_line_error([*base, "--sampler", "sde", "--atol", "1e-4"], capsys)
    assert "--last-step apply to --sampler sde, not heun" in _one_line_error(
        [*base, "--out", str(tmp_path / "x"), "--last-step", "none"], capsys)
    assert main([*base, "--out", str(tmp_path / "o"), "--sampler", "dopri5", "--rtol", "1e-4"]) == 0
    assert json.loads((tmp_path / "o" / "sampling.json").read_text())["ode"] == ODESettings(rtol=1e-4).record()
