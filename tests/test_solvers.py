"""The multistep solvers (DPM-Solver++ 2M, UniPC through diffusers' schedulers): on an
analytic epsilon model and an analytic velocity field whose exact probability-flow maps are
known, against diffusers' own DiTPipeline, and from the command line."""

from __future__ import annotations

import json
import math

import pytest
import torch

import leandit
from leandit.backbones import backbone
from leandit.diffusion import GaussianDiffusion, LinearFlow, make_objective
from leandit.diffusion.solvers import SolverSettings, make_scheduler
from leandit.evaluate.sampling import model_fn_for

from conftest import tiny_model
from diffusers_models import tiny_diffusers_dit
from test_flow import MU, S, gaussian_velocity, quantiles

Z = quantiles(401).to(torch.float64)


def gaussian_eps(diffusion: GaussianDiffusion):
    """E[eps | x_t] for data N(mu, s^2) under the process: sqrt(1 - a) (x - sqrt(a) mu) / (a s^2 + 1 - a)."""
    ab = torch.tensor(diffusion.alphas_cumprod)

    def model_fn(x, t):
        a = ab[t].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        return torch.sqrt(1 - a) * (x - torch.sqrt(a) * MU) / (a * S * S + 1 - a)

    return model_fn


def exact_map(diffusion: GaussianDiffusion) -> torch.Tensor:
    """The probability-flow ODE from x_T = Z to clean data: the standardised value is kept."""
    a = float(diffusion.alphas_cumprod[-1])
    return MU + S * (Z - math.sqrt(a) * MU) / math.sqrt(a * S * S + 1 - a)


@pytest.mark.parametrize("solver", ["dpm++2m", "unipc"])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_the_solvers_converge_to_the_exact_probability_flow_of_an_epsilon_model(solver, spacing):
    d = GaussianDiffusion.dit(learn_sigma=False)
    exact = exact_map(d)
    errors = [float((d.sample(gaussian_eps(d), lambda: Z.clone(), sampler=solver, steps=n,
                              solver=SolverSettings(spacing=spacing)) - exact).abs().max()) for n in (10, 20, 40)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 5e-3, errors
    x = d.sample(gaussian_eps(d), lambda: Z.clone(), sampler=solver, steps=40, solver=SolverSettings(spacing=spacing))
    assert abs(float(x.mean()) - MU) < 2e-3 and abs(float(x.std(unbiased=False)) - S) < 5e-3


@pytest.mark.parametrize("solver", ["dpm++2m", "unipc"])
def test_the_solvers_integrate_a_velocity_model_in_sits_time(solver):
    """diffusers' flow sigma is 1 - t and its target noise - data = -v: a sign or time slip
    sends every sample away from mu + s z."""
    flow = LinearFlow()
    x = flow.sample(gaussian_velocity(MU, S), lambda: Z.clone(), sampler=solver, steps=40)
    assert float((x - (MU + S * Z)).abs().max()) < 2e-2
    assert abs(float(x.mean()) - MU) < 5e-3 and abs(float(x.std(unbiased=False)) - S) < 1e-2
    shifted = flow.sample(gaussian_velocity(MU, S), lambda: Z.clone(), sampler=solver, steps=40, solver=SolverSettings(flow_shift=3.0))
    assert float((shifted - (MU + S * Z)).abs().max()) < 5e-2 and not torch.equal(shifted, x)


def test_dpm_solver_samples_what_diffusers_dit_pipeline_samples():
    from diffusers import AutoencoderKL, DiTPipeline

    torch.manual_seed(0)
    model = tiny_diffusers_dit()
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=1).eval()
    diffusion = make_objective(backbone(model).spec)
    scheduler = make_scheduler("dpm++2m", SolverSettings(), betas=diffusion.betas)
    labels = torch.tensor([3, 7])
    pipe = DiTPipeline(transformer=model, vae=vae, scheduler=scheduler)
    theirs = pipe(class_labels=labels.tolist(), guidance_scale=1.0, num_inference_steps=12,
                  generator=torch.Generator().manual_seed(4), output_type="pt").images
    latents = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        x = diffusion.sample(model_fn_for(model, labels, 1.0), lambda: latents.clone(), sampler="dpm++2m", steps=12)
        ours = (vae.decode(x / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_sample_records_the_solver_settings_and_refuses_misplaced_ones(tmp_path, capsys):
    from leandit.cli import main

    torch.manual_seed(0)
    folder = tmp_path / "dit"
    leandit.save_model(tiny_model(), folder)
    base = ["sample", str(folder), "--device", "cpu", "--quiet", "--num-samples", "2"]
    assert main([*base, "--out", str(tmp_path / "a"), "--sampler", "unipc", "--spacing", "trailing"]) == 0
    settings = json.loads((tmp_path / "a" / "sampling.json").read_text())
    assert settings["steps"] == 20 and settings["solver"] == SolverSettings(spacing="trailing").record()
    capsys.readouterr()
    for argv, message in (([*base, "--out", str(tmp_path / "b"), "--spacing", "leading"], "--spacing apply to --sampler dpm++2m or unipc, not ddim"),
                          ([*base, "--out", str(tmp_path / "b"), "--sampler", "dpm++2m", "--flow-shift", "3"], "--flow-shift applies to flow")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_bench_times_whole_trajectories_under_a_chosen_sampler(tmp_path, capsys):
    from leandit.cli import main

    torch.manual_seed(0)
    folder = tmp_path / "dit"
    leandit.save_model(tiny_model(), folder)
    out = tmp_path / "bench.md"
    assert main(["bench", str(folder), "--trajectory", "4", "--sampler", "unipc", "--rounds", "1", "--warmup", "0",
                 "--no-memory", "--device", "cpu", "--out", str(out)]) == 0
    assert "4-step sampling run per model (unipc" in out.read_text()
    capsys.readouterr()
    assert main(["bench", str(folder), "--trajectory", "4", "--sampler", "sde", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "sampler 'sde' does not fit a diffusion model" in err and len(err.splitlines()) == 1


def test_euler_with_a_flow_shift_is_sd3s_flow_matching_euler_schedule():
    """diffusers' FlowMatchEulerDiscreteScheduler with shift 3 and SD3's pipeline sigmas
    (linspace(1, 1/N, N)) on the same velocity field, in diffusers' convention."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    steps = 12
    ours = LinearFlow().sample(gaussian_velocity(MU, S), lambda: Z.clone(), sampler="euler", steps=steps,
                               solver=SolverSettings(flow_shift=3.0))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps).tolist())
    x = Z.clone()
    velocity = gaussian_velocity(MU, S)
    for t in scheduler.timesteps:
        sit_t = torch.full((x.shape[0],), 1 - float(t) / 1000, dtype=torch.float64)
        x = scheduler.step(-velocity(x, sit_t), t, x).prev_sample  # noise - data
    torch.testing.assert_close(ours, x.to(ours.dtype), rtol=1e-5, atol=1e-5)
    plain = LinearFlow().sample(gaussian_velocity(MU, S), lambda: Z.clone(), sampler="euler", steps=steps)
    assert not torch.allclose(ours, plain)
