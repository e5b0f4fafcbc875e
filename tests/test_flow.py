"""SiT's linear-interpolant flow checked against closed forms.

Data x1, noise x0, x_t = t x1 + (1 - t) x0 (t = 0 noise, t = 1 data). For Gaussian data
N(mu, s^2) everything is linear and known in closed form: the exact velocity, the score and
the ODE's transport map x(1) = mu + s x(0), so the samplers' errors can be measured exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from leandit.diffusion import LinearFlow, StepRandom

from conftest import RecordingNoise




MU, S = 0.3, 0.6  # s != 0.5: Heun with one step happens to be exact for s = 1/2


def _tt(t, x):
    return t.to(torch.float64).reshape(-1, *([1] * (x.dim() - 1)))


def gaussian_velocity(mu, s, extra=None, record=None):
    """E[x1 - x0 | x_t] for x1 ~ N(mu, s^2), x0 ~ N(0, 1) per dimension."""

    def model_fn(x, t):
        if record is not None:
            record.append((t.clone(), x.clone()))
        tt = _tt(t, x)
        d = tt * tt * s * s + (1 - tt) ** 2
        e1 = mu + tt * s * s * (x - tt * mu) / d
        e0 = (1 - tt) * (x - tt * mu) / d
        v = e1 - e0
        if extra is not None:
            v = torch.cat([v, torch.full_like(v, extra)], 1)
        return v.to(x.dtype)

    return model_fn


def gaussian_score(x, t, mu, s):
    """grad log p_t(x) for p_t = N(t mu, t^2 s^2 + (1 - t)^2), written independently."""
    return -(x - t * mu) / (t * t * s * s + (1 - t) ** 2)


def point_mass_velocity(mu, record=None):
    def model_fn(x, t):
        if record is not None:
            record.append((t.clone(), x.clone()))
        return ((mu - x) / (1 - _tt(t, x))).to(x.dtype)

    return model_fn


def quantiles(n):
    z = torch.from_numpy(norm.ppf((np.arange(n) + 0.5) / n)).reshape(n, 1)
    return (z - z.mean()) / z.std(unbiased=False)


# ------------------------------------------------------------------------------------------
# interpolant and training loss
# ------------------------------------------------------------------------------------------


def test_interpolate_and_target():
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(4, 2, 3, 3, generator=gen, dtype=torch.float64)
    x0 = torch.randn(4, 2, 3, 3, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.0, 0.25, 0.9, 1.0], dtype=torch.float64)
    xt, target = LinearFlow().interpolate(x1, x0, t)
    tn = t.numpy().reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(xt.numpy(), tn * x1.numpy() + (1 - tn) * x0.numpy(), rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(target.numpy(), x1.numpy() - x0.numpy(), rtol=1e-14)
    np.testing.assert_array_equal(xt[0].numpy(), x0[0].numpy())  # t = 0 is pure noise
    np.testing.assert_array_equal(xt[3].numpy(), x1[3].numpy())  # t = 1 is the data


def test_training_loss_zero_for_exact_velocity_and_mse_otherwise():
    flow = LinearFlow()
    gen = torch.Generator().manual_seed(1)
    x1 = torch.randn(5, 2, 2, 2, generator=gen, dtype=torch.float64)
    x0 = torch.randn(5, 2, 2, 2, generator=gen, dtype=torch.float64)
    t = torch.rand(5, generator=gen, dtype=torch.float64)
    seen = {}

    def exact(x, tt):
        seen["x"], seen["t"] = x, tt
        return x1 - x0

    terms = flow.training_losses(exact, x1, t, x0)
    assert float(terms["loss"].abs().max()) == 0.0 and terms["loss"].shape == (5,)
    tn = t.numpy().reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(seen["x"].numpy(), tn * x1.numpy() + (1 - tn) * x0.numpy(), atol=1e-14)
    assert seen["t"] is t or torch.equal(seen["t"], t)
    np.testing.assert_array_equal(terms["xt"].numpy(), seen["x"].numpy())

    out = torch.randn(5, 2, 2, 2, generator=gen, dtype=torch.float64)
    terms = flow.training_losses(lambda x, tt: out, x1, t, x0)
    expected = ((out.numpy() - (x1.numpy() - x0.numpy())) ** 2).reshape(5, -1).mean(1)
    np.testing.assert_allclose(terms["loss"].numpy(), expected, rtol=1e-12)
    np.testing.assert_array_equal(terms["mse"].numpy(), terms["loss"].numpy())
    # learned-sigma SiT outputs (2C channels): only the first C enter the loss
    wide = torch.cat([out, 1e3 * torch.ones_like(out)], 1)
    terms_wide = flow.training_losses(lambda x, tt: wide, x1, t, x0)
    np.testing.assert_array_equal(terms_wide["loss"].numpy(), terms["loss"].numpy())
    assert terms_wide["model_output"].shape == (5, 4, 2, 2)


def test_training_loss_gradient_is_the_velocity_residual():
    flow = LinearFlow()
    gen = torch.Generator().manual_seed(2)
    x1 = torch.randn(3, 1, 4, generator=gen, dtype=torch.float64)
    x0 = torch.randn(3, 1, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.8], dtype=torch.float64)
    out = torch.zeros(3, 2, 4, dtype=torch.float64, requires_grad=True)
    flow.training_losses(lambda x, tt: out, x1, t, x0)["loss"].sum().backward()
    expected = 2 * (0 - (x1 - x0)).numpy() / 4
    np.testing.assert_allclose(out.grad[:, :1].numpy(), expected, rtol=1e-12)
    assert float(out.grad[:, 1:].abs().max()) == 0.0


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_sample_timesteps_in_range(eps):
    flow = LinearFlow(train_eps=eps)
    t = flow.sample_timesteps(2048, StepRandom(3, 7, 2048, 0, 1, "cpu"))
    assert t.shape == (2048,) and t.is_floating_point()
    assert float(t.min()) >= eps and float(t.max()) <= 1 - eps
    width = 1 - 2 * eps
    assert abs(float(t.double().mean()) - 0.5) < 5 * width / math.sqrt(12 * 2048)
    assert abs(float(t.double().std()) - width / math.sqrt(12)) < 0.02 * width


@pytest.mark.parametrize("eps", [-0.1, 0.5, 0.7])
def test_invalid_train_eps_raises(eps):
    with pytest.raises(ValueError):
        LinearFlow(train_eps=eps)


# ------------------------------------------------------------------------------------------
# samplers
# ------------------------------------------------------------------------------------------


def test_euler_one_step_lands_on_a_point_mass():
    flow = LinearFlow()
    mu = torch.tensor([[0.4, -0.7, 1.3]], dtype=torch.float64)
    z = torch.randn(8, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x = flow.sample(point_mass_velocity(mu), lambda: z.clone(), sampler="euler", steps=1)
    np.testing.assert_allclose(x.numpy(), np.broadcast_to(mu.numpy(), (8, 3)), atol=1e-12)


@pytest.mark.parametrize("steps", [3, 10])
def test_euler_point_mass_follows_the_straight_line(steps):
    """On a point mass the ODE's paths are straight: Euler is exact at every step, and the
    model sees t = i / steps for i = 0 .. steps-1 with x_t = t mu + (1 - t) z."""
    flow = LinearFlow()
    mu = torch.tensor([[0.4, -0.7]], dtype=torch.float64)
    z = torch.randn(6, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    record = []
    x = flow.sample(point_mass_velocity(mu, record), lambda: z.clone(), sampler="euler", steps=steps)
    np.testing.assert_allclose(x.numpy(), np.broadcast_to(mu.numpy(), (6, 2)), atol=1e-6)
    assert len(record) == steps
    for i, (t, xx) in enumerate(record):
        assert t.shape == (6,)
        np.testing.assert_allclose(t.double().numpy(), i / steps, atol=1e-7)
        np.testing.assert_allclose(xx.numpy(), (i / steps) * mu.numpy() + (1 - i / steps) * z.numpy(), atol=1e-6)


def _ode_errors(sampler, steps, extra=None):
    flow = LinearFlow()
    z = torch.linspace(-3, 3, 25, dtype=torch.float64).reshape(25, 1)
    x = flow.sample(gaussian_velocity(MU, S, extra), lambda: z.clone(), sampler=sampler, steps=steps)
    return float(np.abs(x.numpy() - (MU + S * z.numpy())).max()), x


def test_euler_and_heun_converge_to_the_exact_transport_map():
    """x(1) = mu + s x(0) is the exact ODE solution; Euler is first order, Heun second."""
    euler = {n: _ode_errors("euler", n)[0] for n in (10, 20, 40, 80)}
    heun = {n: _ode_errors("heun", n)[0] for n in (10, 20, 40, 80)}
    assert euler[80] < 0.04
    assert heun[20] < 2e-3 and heun[80] < 2e-4
    for a, b in ((10, 20), (20, 40), (40, 80)):
        assert 1.6 < euler[a] / euler[b] < 2.4  # first order
        assert 3.0 < heun[a] / heun[b] < 5.0  # second order
        assert heun[a] < euler[a] / 20  # much smaller at equal steps


def test_heun_visits_both_ends_of_each_interval():
    record = []
    z = torch.zeros(2, 1, dtype=torch.float64)
    LinearFlow().sample(gaussian_velocity(MU, S, record=record), lambda: z.clone(), sampler="heun", steps=4)
    times = [round(float(t[0]), 6) for t, _ in record]
    assert times == [0.0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 1.0]


@pytest.mark.parametrize("sampler, steps, tol", [("euler", 200, 0.01), ("heun", 25, 1e-3)])
def test_ode_samplers_gaussian_moments(sampler, steps, tol):
    flow = LinearFlow()
    z = quantiles(2001)
    x = flow.sample(gaussian_velocity(MU, S), lambda: z.clone(), sampler=sampler, steps=steps).numpy().ravel()
    assert abs(x.mean() - MU) < tol
    assert abs(x.std() - S) < tol


@pytest.mark.parametrize("sampler", ["euler", "heun", "sde"])
def test_learned_sigma_channels_are_ignored(sampler):
    flow = LinearFlow()
    a = flow.sample(gaussian_velocity(MU, S), RecordingNoise((16, 1), 6), sampler=sampler, steps=8)
    b = flow.sample(gaussian_velocity(MU, S, extra=50.0), RecordingNoise((16, 1), 6), sampler=sampler, steps=8)
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_sde_is_stochastic_and_reproducible():
    flow = LinearFlow()
    a = flow.sample(gaussian_velocity(MU, S), RecordingNoise((8, 1), 10), sampler="sde", steps=10)
    b = flow.sample(gaussian_velocity(MU, S), RecordingNoise((8, 1), 10), sampler="sde", steps=10)
    c = flow.sample(gaussian_velocity(MU, S), RecordingNoise((8, 1), 11), sampler="sde", steps=10)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert np.abs(a.numpy() - c.numpy()).max() > 1e-3


def test_default_sampler_is_heun_with_50_steps():
    flow = LinearFlow()
    assert flow.default_sampler == "heun" and set(flow.samplers) == {"euler", "heun", "sde", "dopri5", "dpm++2m", "unipc"}
    record = []
    z = torch.zeros(2, 1, dtype=torch.float64)
    flow.sample(gaussian_velocity(MU, S, record=record), lambda: z.clone())
    assert len(record) == 100  # 50 Heun steps, two evaluations each


def test_clip_denoised_clamps_the_result():
    z = torch.linspace(-4, 4, 9, dtype=torch.float64).reshape(9, 1)
    x = LinearFlow().sample(gaussian_velocity(0.5, 1.0), lambda: z.clone(), sampler="heun", steps=10, clip_denoised=True)
    assert float(x.max()) == 1.0 and float(x.min()) == -1.0
    inside = (x.abs() < 1).numpy().ravel()
    np.testing.assert_allclose(x.numpy().ravel()[inside], (0.5 + z.numpy().ravel())[inside], atol=1e-3)


@pytest.mark.parametrize("kwargs", [dict(sampler="ddim"), dict(sampler="euler", steps=0), dict(sampler="heun", steps=-2)])
def test_invalid_sampler_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        LinearFlow().sample(gaussian_velocity(MU, S), RecordingNoise((2, 1), 0), **kwargs)
