"""DiT's Gaussian diffusion checked against closed forms and independent float64 computations.

Every expected value here is computed in this file (numpy/scipy/fractions, float64) from the
textbook definitions, never by calling the code under test a second way.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy.stats import norm

from leandit.diffusion import GaussianDiffusion, StepRandom, linear_betas, space_timesteps
from leandit.diffusion.gaussian import discretized_gaussian_log_likelihood, normal_kl

from conftest import RecordingNoise





T = 1000
# The DiT/ADM linear schedule, written out from its definition (not via np.linspace).
BETAS = 1e-4 + np.arange(T, dtype=np.float64) * (0.02 - 1e-4) / (T - 1)
ALPHAS = 1.0 - BETAS
ABAR = np.cumprod(ALPHAS)
ABAR_PREV = np.concatenate([[1.0], ABAR[:-1]])
POST_VAR = BETAS * (1.0 - ABAR_PREV) / (1.0 - ABAR)  # 0 at t = 0


def post_logvar_clipped(t):
    """log of the posterior variance, with t = 0 (variance 0) replaced by t = 1."""
    t = np.asarray(t)
    return np.log(np.where(t == 0, POST_VAR[1], POST_VAR[t]))


def bayes_posterior(x0, xt, ab, ab_prev, alpha):
    """Mean and variance of q(x_{t-1} | x_t, x0) from the Gaussian product
    N(x_t; sqrt(alpha) x_{t-1}, 1 - alpha) N(x_{t-1}; sqrt(ab_prev) x0, 1 - ab_prev) (t >= 1)."""
    beta = 1.0 - alpha
    precision = alpha / beta + 1.0 / (1.0 - ab_prev)
    var = 1.0 / precision
    mean = var * (np.sqrt(alpha) * xt / beta + np.sqrt(ab_prev) * x0 / (1.0 - ab_prev))
    return mean, var


def bcast(a, ndim):
    """(N,) -> (N, 1, ..., 1)."""
    return np.asarray(a).reshape(-1, *([1] * (ndim - 1)))


def adm_kept(num_timesteps, counts):
    """The ADM/DiT respacing rule in exact rational arithmetic: within each of the equal
    sections, `count` steps at positions j * (size - 1) / (count - 1), rounded to nearest.
    leandit's one documented departure: a one-step section keeps its LAST timestep (ADM keeps
    the first), so a one-step sampler starts from pure noise."""
    base, extra = divmod(num_timesteps, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        size = base + (1 if i < extra else 0)
        stride = Fraction(size - 1, count - 1) if count > 1 else Fraction(1)
        # A tie (x.5) is only well defined when the stride is a dyadic fraction, so that the
        # implementation's accumulated float positions are exact; ADM then rounds half to even.
        dyadic = stride.denominator & (stride.denominator - 1) == 0
        if count == 1:
            kept.append(start + size - 1)
            start += size
            continue
        for j in range(count):
            pos = j * stride
            assert pos.denominator != 2 or dyadic, "test spec has an ill-defined rounding tie"
            kept.append(start + round(pos))  # Fraction.__round__: exact, half to even
        start += size
    return kept


# ------------------------------------------------------------------------------------------
# schedule and respacing
# ------------------------------------------------------------------------------------------


def test_linear_betas_endpoints_and_spacing():
    b = linear_betas(1000)
    assert b.dtype == np.float64 and b.shape == (1000,)
    assert b[0] == pytest.approx(1e-4, abs=1e-15)
    assert b[-1] == pytest.approx(0.02, abs=1e-15)
    np.testing.assert_allclose(b, BETAS, rtol=0, atol=1e-15)
    # Other lengths are rescaled by 1000 / n (so 4000 steps span 2.5e-5 .. 5e-3).
    b4 = linear_betas(4000)
    assert b4[0] == pytest.approx(2.5e-5) and b4[-1] == pytest.approx(5e-3)


def test_alphas_cumprod_and_posterior_tables():
    d = GaussianDiffusion(linear_betas(T), learn_sigma=False)
    np.testing.assert_allclose(d.alphas_cumprod, ABAR, rtol=1e-12)
    np.testing.assert_allclose(d.alphas_cumprod_prev, ABAR_PREV, rtol=1e-12)
    # Closed form via logs, a different route from the running product.
    assert d.alphas_cumprod[-1] == pytest.approx(math.exp(np.sum(np.log1p(-BETAS))), rel=1e-10)
    assert d.alphas_cumprod[-1] == pytest.approx(4.0358e-5, rel=1e-3)  # the well-known DiT value
    assert d.num_timesteps == T


@pytest.mark.parametrize("bad", [np.array([0.1, 0.0]), np.array([0.5, 1.5]), np.ones((2, 2)) * 0.1])
def test_invalid_betas_raise(bad):
    with pytest.raises(ValueError):
        GaussianDiffusion(bad)


def test_invalid_fixed_variance_raises():
    with pytest.raises(ValueError):
        GaussianDiffusion(linear_betas(10), fixed_variance="medium")


def test_space_timesteps_250_matches_the_adm_rule():
    kept = space_timesteps(1000, 250)
    # exact rational positions j * 999/249, rounded (no ties: 999/249 = 333/83)
    expected = [math.floor(Fraction(j * 999, 249) + Fraction(1, 2)) for j in range(250)]
    assert kept == expected
    assert kept[0] == 0 and kept[-1] == 999 and len(kept) == 250
    # 999 = 249 * 4 + 3: every gap is 4 except exactly three gaps of 5
    gaps = np.diff(kept)
    assert set(gaps.tolist()) == {4, 5} and int((gaps == 5).sum()) == 3
    assert kept[:6] == [0, 4, 8, 12, 16, 20]
    # the string form is the same spec
    assert space_timesteps(1000, "250") == kept


@pytest.mark.parametrize("count, stride", [(50, 20), (25, 40), (100, 10), (10, 100), (3, 334), (1000, 1)])
def test_space_timesteps_ddim_constant_stride(count, stride):
    kept = space_timesteps(1000, f"ddim{count}")
    assert kept == [stride * k for k in range(count)]


def test_space_timesteps_ddim50_explicit():
    kept = space_timesteps(1000, "ddim50")
    assert kept[:4] == [0, 20, 40, 60] and kept[-1] == 980 and len(kept) == 50


@pytest.mark.parametrize("spec", ["10,15,20", "1,2,3", "5,5", "3,333,333", "7"])
def test_space_timesteps_sections(spec):
    counts = [int(c) for c in spec.split(",")]
    kept = space_timesteps(1000, spec)
    assert kept == adm_kept(1000, counts)
    # properties: sorted, unique, in range, per-section counts, section endpoints included
    assert kept == sorted(set(kept)) and 0 <= kept[0] and kept[-1] < 1000
    base, extra = divmod(1000, len(counts))
    start = 0
    for i, count in enumerate(counts):
        size = base + (1 if i < extra else 0)
        inside = [k for k in kept if start <= k < start + size]
        assert len(inside) == count
        assert inside[-1] == start + size - 1
        if count > 1:
            assert inside[0] == start
        start += size


def test_space_timesteps_rounds_ties_half_to_even_like_adm():
    # 25 of 1000: stride 999/24 = 41.625 is exact in binary, so positions 166.5, 499.5, 832.5
    # are exact ties; ADM's Python round() sends them to the even neighbour.
    kept = space_timesteps(1000, 25)
    assert kept == adm_kept(1000, [25])
    assert kept[4] == 166 and kept[12] == 500 and kept[20] == 832


def test_space_timesteps_10_15_20_section_boundaries():
    kept = space_timesteps(1000, "10,15,20")
    # sections of 334, 333, 333 timesteps
    assert kept[:10] == [37 * k for k in range(10)]  # stride 333/9 = 37 exactly
    assert kept[10] == 334 and kept[24] == 666 and kept[25] == 667 and kept[-1] == 999


@pytest.mark.parametrize(
    "spec", [0, -3, 1001, "0", "10,0", "10,400,5", "ddim999", "ddim0", "ddimx", "abc", "", "10,,5"]
)
def test_space_timesteps_invalid_specs_raise(spec):
    with pytest.raises(ValueError):
        space_timesteps(1000, spec)


@pytest.mark.parametrize("spec", [250, 50, 2, "ddim50", "10,15,20"])
def test_respaced_keeps_alphas_cumprod_and_maps_timesteps(spec):
    d = GaussianDiffusion(linear_betas(T), learn_sigma=True)
    r = d.respaced(spec)
    if isinstance(spec, str) and spec.startswith("ddim"):
        kept = [20 * k for k in range(int(spec[4:]))]
    else:
        kept = adm_kept(T, [int(c) for c in str(spec).split(",")])
    assert r.num_timesteps == len(kept)
    np.testing.assert_allclose(r.alphas_cumprod, ABAR[kept], rtol=1e-10)
    assert ((r.betas > 0) & (r.betas <= 1)).all()
    assert r.learn_sigma is True and r.fixed_variance == d.fixed_variance
    t = torch.arange(len(kept))
    mapped = r.model_timesteps(t)
    assert mapped.dtype == torch.long
    assert mapped.tolist() == kept


def test_single_step_processes_can_be_built():
    """A one-step process (sample(steps=1), respaced(1), or one beta) must construct: its
    t = 0 log variance cannot be clipped to a t = 1 value that does not exist (it once
    raised IndexError in GaussianDiffusion.__init__ at post_var[1])."""
    one = GaussianDiffusion(np.array([0.3]), learn_sigma=True)
    assert one.num_timesteps == 1 and one.alphas_cumprod[0] == pytest.approx(0.7)
    r = GaussianDiffusion(linear_betas(T), learn_sigma=True).respaced(1)
    assert r.num_timesteps == 1
    k = int(r.model_timesteps(torch.tensor([0]))[0])
    assert r.alphas_cumprod[0] == pytest.approx(ABAR[k], rel=1e-12)


def test_respacing_twice_composes_the_maps():
    d = GaussianDiffusion(linear_betas(T))
    r = d.respaced(250).respaced(10)
    kept250 = adm_kept(T, [250])
    kept = [kept250[i] for i in adm_kept(250, [10])]
    assert r.model_timesteps(torch.arange(10)).tolist() == kept
    np.testing.assert_allclose(r.alphas_cumprod, ABAR[kept], rtol=1e-10)


def test_model_timesteps_identity_for_the_full_process():
    d = GaussianDiffusion(linear_betas(T))
    t = torch.tensor([0, 5, 999])
    assert d.model_timesteps(t).tolist() == [0, 5, 999]


def test_sample_timesteps_uniform_ints_from_step_random():
    d = GaussianDiffusion(linear_betas(T))
    t = d.sample_timesteps(4096, StepRandom(0, 0, 4096, 0, 1, "cpu"))
    assert t.shape == (4096,) and t.dtype == torch.long
    assert int(t.min()) >= 0 and int(t.max()) <= 999
    assert abs(float(t.double().mean()) - 499.5) < 5 * 288.7 / 64  # 5 standard errors


# ------------------------------------------------------------------------------------------
# forward process and posterior
# ------------------------------------------------------------------------------------------


def test_q_sample_exact_with_known_noise():
    d = GaussianDiffusion(linear_betas(T))
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 2, 3, 3, generator=gen, dtype=torch.float64)
    eps = torch.randn(6, 2, 3, 3, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 1, 17, 500, 998, 999])
    xt = d.q_sample(x0, t, eps).numpy()
    ab = bcast(ABAR[t.numpy()], 4)
    expected = np.sqrt(ab) * x0.numpy() + np.sqrt(1 - ab) * eps.numpy()
    np.testing.assert_allclose(xt, expected, rtol=0, atol=1e-6)


def test_q_sample_monte_carlo_moments():
    d = GaussianDiffusion(linear_betas(T))
    n = 200_000
    gen = torch.Generator().manual_seed(1)
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    for step in (10, 300, 900):
        t = torch.full((n,), step, dtype=torch.long)
        xt = d.q_sample(x0, t, torch.randn(n, 1, generator=gen, dtype=torch.float64)).numpy().ravel()
        var = 1 - ABAR[step]
        assert abs(xt.mean() - math.sqrt(ABAR[step]) * 0.7) < 5 * math.sqrt(var / n)
        assert abs(xt.var() - var) < 5 * var * math.sqrt(2 / n)


def test_q_posterior_equals_bayes_product():
    d = GaussianDiffusion(linear_betas(T))
    gen = torch.Generator().manual_seed(2)
    t = torch.tensor([1, 2, 50, 500, 999])
    x0 = torch.randn(5, 2, 2, 2, generator=gen, dtype=torch.float64)
    xt = torch.randn(5, 2, 2, 2, generator=gen, dtype=torch.float64)
    mean, var, logvar = d.q_posterior(x0, xt, t)
    tn = t.numpy()
    exp_mean, exp_var = bayes_posterior(
        x0.numpy(), xt.numpy(), bcast(ABAR[tn], 4), bcast(ABAR_PREV[tn], 4), bcast(ALPHAS[tn], 4)
    )
    np.testing.assert_allclose(mean.numpy(), exp_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var.numpy().reshape(-1), exp_var.reshape(-1), rtol=1e-5)
    np.testing.assert_allclose(logvar.numpy().reshape(-1), np.log(exp_var.reshape(-1)), rtol=1e-5)


def test_q_posterior_at_t0_is_the_point_mass_on_x0():
    d = GaussianDiffusion(linear_betas(T))
    x0 = torch.tensor([[0.3], [-0.8]], dtype=torch.float64)
    xt = torch.tensor([[1.5], [2.0]], dtype=torch.float64)
    t = torch.zeros(2, dtype=torch.long)
    mean, var, logvar = d.q_posterior(x0, xt, t)
    np.testing.assert_allclose(mean.numpy(), x0.numpy(), atol=1e-6)
    assert float(var.abs().max()) == 0.0
    # the log variance is clipped to its t = 1 value instead of log 0
    np.testing.assert_allclose(logvar.numpy().ravel(), np.log(POST_VAR[1]) * np.ones(2), rtol=1e-5)


# ------------------------------------------------------------------------------------------
# the reverse step a model output stands for
# ------------------------------------------------------------------------------------------

P_T = torch.tensor([0, 1, 10, 500, 999])


def _p_inputs(seed=3, c=2):
    gen = torch.Generator().manual_seed(seed)
    xt = torch.randn(5, c, 2, 2, generator=gen, dtype=torch.float64)
    eps = torch.randn(5, c, 2, 2, generator=gen, dtype=torch.float64)
    return xt, eps


@pytest.mark.parametrize("v", [-1.0, 1.0, 0.0, 0.37])
def test_p_mean_variance_learned_range(v):
    d = GaussianDiffusion(linear_betas(T), learn_sigma=True)
    xt, eps = _p_inputs()
    out = torch.cat([eps, torch.full_like(eps, v)], dim=1)
    p = d.p_mean_variance(out, xt, P_T)
    tn = P_T.numpy()
    lo, hi = post_logvar_clipped(tn), np.log(BETAS[tn])
    frac = (v + 1) / 2
    exp_logvar = frac * hi + (1 - frac) * lo
    assert p.log_variance.shape == xt.shape
    np.testing.assert_allclose(p.log_variance.numpy()[:, 0, 0, 0], exp_logvar, rtol=1e-5)
    np.testing.assert_allclose(p.variance.numpy()[:, 0, 0, 0], np.exp(exp_logvar), rtol=1e-5)
    if v == -1.0:
        np.testing.assert_allclose(p.log_variance.numpy()[1:, 0, 0, 0], np.log(POST_VAR[tn[1:]]), rtol=1e-5)
    if v == 1.0:
        np.testing.assert_allclose(p.variance.numpy()[:, 0, 0, 0], BETAS[tn], rtol=1e-5)
    if v == 0.0:
        np.testing.assert_allclose(p.variance.numpy()[:, 0, 0, 0], np.sqrt(BETAS[tn] * np.exp(lo)), rtol=1e-5)
    # mean: Bayes posterior with the predicted x0
    ab = bcast(ABAR[tn], 4)
    x0_hat = (xt.numpy() - np.sqrt(1 - ab) * eps.numpy()) / np.sqrt(ab)
    np.testing.assert_allclose(p.pred_x0.numpy(), x0_hat, rtol=1e-5, atol=1e-4)
    exp_mean, _ = bayes_posterior(x0_hat[1:], xt.numpy()[1:], ab[1:], bcast(ABAR_PREV[tn[1:]], 4), bcast(ALPHAS[tn[1:]], 4))
    np.testing.assert_allclose(p.mean.numpy()[1:], exp_mean, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(p.mean.numpy()[0], x0_hat[0], atol=1e-5)  # t = 0: the mean is x0
    np.testing.assert_array_equal(p.pred_eps.numpy(), eps.numpy())


def test_p_mean_variance_elementwise_interpolation():
    d = GaussianDiffusion(linear_betas(T), learn_sigma=True)
    xt, eps = _p_inputs(seed=4)
    v = torch.rand(xt.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2 - 1
    p = d.p_mean_variance(torch.cat([eps, v], 1), xt, P_T)
    tn = P_T.numpy()
    frac = (v.numpy() + 1) / 2
    expected = frac * bcast(np.log(BETAS[tn]), 4) + (1 - frac) * bcast(post_logvar_clipped(tn), 4)
    np.testing.assert_allclose(p.log_variance.numpy(), expected, rtol=1e-5)


def test_p_mean_variance_wrong_channel_count_raises():
    d = GaussianDiffusion(linear_betas(T), learn_sigma=True)
    xt, eps = _p_inputs()
    with pytest.raises(ValueError):
        d.p_mean_variance(eps, xt, P_T)


@pytest.mark.parametrize("kind", ["large", "small"])
def test_p_mean_variance_fixed_variances(kind):
    d = GaussianDiffusion(linear_betas(T), learn_sigma=False, fixed_variance=kind)
    xt, eps = _p_inputs()
    p = d.p_mean_variance(eps, xt, P_T)
    tn = P_T.numpy()
    if kind == "large":  # beta_t, with t = 0 replaced by the posterior variance at t = 1
        expected = np.where(tn == 0, POST_VAR[1], BETAS[tn])
        np.testing.assert_allclose(p.variance.numpy()[:, 0, 0, 0], expected, rtol=1e-5)
        np.testing.assert_allclose(p.log_variance.numpy()[:, 0, 0, 0], np.log(expected), rtol=1e-5)
    else:  # the true posterior variance; its log clipped at t = 0
        np.testing.assert_allclose(p.variance.numpy()[1:, 0, 0, 0], POST_VAR[tn[1:]], rtol=1e-5)
        np.testing.assert_allclose(p.log_variance.numpy()[:, 0, 0, 0], post_logvar_clipped(tn), rtol=1e-5)
    assert p.variance.shape == xt.shape


def test_p_mean_variance_fixed_variance_ignores_extra_channels():
    d = GaussianDiffusion(linear_betas(T), learn_sigma=False)
    xt, eps = _p_inputs()
    a = d.p_mean_variance(eps, xt, P_T)
    b = d.p_mean_variance(torch.cat([eps, 100 + eps], 1), xt, P_T)
    np.testing.assert_array_equal(a.mean.numpy(), b.mean.numpy())


def test_pred_x0_inverts_q_sample_for_the_true_noise():
    d = GaussianDiffusion(linear_betas(T), learn_sigma=True)
    gen = torch.Generator().manual_seed(6)
    x0 = torch.randn(5, 2, 2, 2, generator=gen, dtype=torch.float64)
    eps = torch.randn(5, 2, 2, 2, generator=gen, dtype=torch.float64)
    tn = P_T.numpy()
    ab = bcast(ABAR[tn], 4)
    xt = torch.from_numpy(np.sqrt(ab) * x0.numpy() + np.sqrt(1 - ab) * eps.numpy())  # independent q_sample
    p = d.p_mean_variance(torch.cat([eps, torch.zeros_like(eps)], 1), xt, P_T)
    np.testing.assert_allclose(p.pred_x0.numpy(), x0.numpy(), atol=1e-4)
    # and for t >= 1 the mean is then the true posterior mean
    exp_mean, _ = bayes_posterior(x0.numpy()[1:], xt.numpy()[1:], ab[1:], bcast(ABAR_PREV[tn[1:]], 4), bcast(ALPHAS[tn[1:]], 4))
    np.testing.assert_allclose(p.mean.numpy()[1:], exp_mean, atol=1e-4)


def test_clip_denoised_clamps_x0_and_keeps_eps_consistent():
    d = GaussianDiffusion(linear_betas(T), learn_sigma=False)
    t = torch.tensor([3, 200, 700, 999])
    tn = t.numpy()
    ab = bcast(ABAR[tn], 2)
    x0_true = np.array([[-3.0, 0.4], [2.5, -0.2], [0.9, -1.7], [5.0, 0.0]])
    eps = np.array([[0.5, -1.0], [1.2, 0.3], [-0.7, 0.1], [0.2, 2.0]])
    xt = np.sqrt(ab) * x0_true + np.sqrt(1 - ab) * eps
    p = d.p_mean_variance(torch.from_numpy(eps), torch.from_numpy(xt), t, clip_denoised=True)
    x0c = np.clip(x0_true, -1, 1)
    np.testing.assert_allclose(p.pred_x0.numpy(), x0c, atol=1e-4)
    # the returned eps is the one that, with the clamped x0, reproduces x_t
    eps_c = (xt - np.sqrt(ab) * x0c) / np.sqrt(1 - ab)
    np.testing.assert_allclose(p.pred_eps.numpy(), eps_c, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.sqrt(ab) * p.pred_x0.numpy() + np.sqrt(1 - ab) * p.pred_eps.numpy(), xt, atol=1e-4)
    exp_mean, _ = bayes_posterior(x0c, xt, ab, bcast(ABAR_PREV[tn], 2), bcast(ALPHAS[tn], 2))
    np.testing.assert_allclose(p.mean.numpy(), exp_mean, atol=1e-4)
    # elements already inside [-1, 1] keep their eps
    inside = np.abs(x0_true) <= 1
    np.testing.assert_allclose(p.pred_eps.numpy()[inside], eps[inside], atol=1e-4)


# ------------------------------------------------------------------------------------------
# KL and decoder likelihood
# ------------------------------------------------------------------------------------------


def test_normal_kl_matches_torch_distributions():
    gen = torch.Generator().manual_seed(7)
    m1, m2 = torch.randn(2, 100, generator=gen, dtype=torch.float64)
    lv1, lv2 = torch.randn(2, 100, generator=gen, dtype=torch.float64) * 2
    got = normal_kl(m1, lv1, m2, lv2)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, torch.exp(0.5 * lv1)), torch.distributions.Normal(m2, torch.exp(0.5 * lv2))
    )
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-10, atol=1e-12)
    assert float(normal_kl(m1, lv1, m1, lv1).abs().max()) < 1e-12


GRID = -1.0 + 2.0 * np.arange(256) / 255.0  # the 256 quantisation levels in [-1, 1]


def direct_loglik(x, mean, scale):
    """log of the Gaussian mass of x's bin; edge bins extended to +-infinity (scipy)."""
    x, mean, scale = np.broadcast_arrays(np.asarray(x, float), np.asarray(mean, float), np.asarray(scale, float))
    hi = (x + 1 / 255 - mean) / scale
    lo = (x - 1 / 255 - mean) / scale
    # bin mass without cancellation: upper tail through the survival function
    mass = np.where(lo > 0, norm.sf(lo) - norm.sf(hi), norm.cdf(hi) - norm.cdf(lo))
    with np.errstate(divide="ignore"):
        out = np.log(mass)
    out = np.where(np.isclose(x, -1.0), norm.logcdf(hi), out)
    out = np.where(np.isclose(x, 1.0), norm.logsf(lo), out)
    return out


@pytest.mark.parametrize("mean, scale", [(0.1, 0.3), (-1.2, 0.3), (1.1, 0.05), (0.0, 0.004), (0.5, 2.0)])
def test_discretized_log_likelihood_against_scipy(mean, scale):
    x = torch.from_numpy(GRID)
    got = discretized_gaussian_log_likelihood(
        x, torch.full_like(x, mean), torch.full_like(x, math.log(scale))
    ).numpy()
    expected = direct_loglik(GRID, mean, scale)
    # log probabilities where the mass is not tiny (1 - cdf cancellation costs ~1e-16 / p)
    ok = expected > math.log(1e-6)
    assert ok.sum() >= 2
    np.testing.assert_allclose(got[ok], expected[ok], rtol=1e-7, atol=1e-9)
    # probabilities everywhere; tiny ones are clamped at 1e-12, never -inf
    np.testing.assert_allclose(np.exp(got), np.exp(expected), rtol=1e-6, atol=2e-12)
    assert np.isfinite(got).all() and (got >= math.log(1e-12) - 1e-9).all()
    # the probabilities of the 256 bins sum to one
    assert np.exp(got).sum() == pytest.approx(1.0, abs=1e-9)


def test_discretized_log_likelihood_edge_bins_are_tails():
    scale = 0.3
    x = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    mean = torch.tensor([-1.2, 1.2], dtype=torch.float64)  # each edge bin near its mean
    got = discretized_gaussian_log_likelihood(x, mean, torch.full_like(x, math.log(scale)))
    lower_tail = norm.logcdf((-1 + 1 / 255 + 1.2) / scale)
    upper_tail = norm.logsf((1 - 1 / 255 - 1.2) / scale)
    assert float(got[0]) == pytest.approx(lower_tail, rel=1e-9)
    assert float(got[1]) == pytest.approx(upper_tail, rel=1e-9)
    # the bin mass alone would be much smaller than the tail
    bin_only = math.log(norm.cdf((-1 + 1 / 255 + 1.2) / scale) - norm.cdf((-1 - 1 / 255 + 1.2) / scale))
    assert float(got[0]) > bin_only + 1.0
    # an edge bin far from the mean: its tiny mass is clamped at 1e-12, not -inf
    far = discretized_gaussian_log_likelihood(x[1:], mean[:1], torch.full_like(x[1:], math.log(scale)))
    assert float(far) == pytest.approx(math.log(1e-12), rel=1e-9)


def test_discretized_log_likelihood_elementwise_float32():
    gen = torch.Generator().manual_seed(8)
    idx = torch.randint(0, 256, (4, 3, 5), generator=gen)
    x = torch.from_numpy(GRID).float()[idx]
    mean = x + 0.02 * torch.randn(x.shape, generator=gen)
    log_scale = torch.log(0.05 + 0.1 * torch.rand(x.shape, generator=gen))
    got = discretized_gaussian_log_likelihood(x, mean, log_scale)
    assert got.dtype == torch.float32 and got.shape == x.shape
    expected = direct_loglik(x.double().numpy(), mean.double().numpy(), np.exp(log_scale.double().numpy()))
    np.testing.assert_allclose(got.numpy(), expected, rtol=2e-3, atol=2e-4)


# ------------------------------------------------------------------------------------------
# training losses
# ------------------------------------------------------------------------------------------


def _train_batch(seed, t_list, c=2):
    gen = torch.Generator().manual_seed(seed)
    n = len(t_list)
    idx = torch.randint(0, 256, (n, c, 3, 3), generator=gen)
    x0 = torch.from_numpy(GRID)[idx]  # quantised data in [-1, 1]
    noise = torch.randn(n, c, 3, 3, generator=gen, dtype=torch.float64)
    t = torch.tensor(t_list)
    return x0, noise, t


def independent_vb_bits(x0, xt, eps_model, v, tn):
    """L_t in bits/dim from first principles: KL of the true posterior from the model's step
    for t > 0, the discretised decoder NLL at t = 0."""
    ab, abp, al = bcast(ABAR[tn], 4), bcast(ABAR_PREV[tn], 4), bcast(ALPHAS[tn], 4)
    x0_hat = (xt - np.sqrt(1 - ab) * eps_model) / np.sqrt(ab)
    frac = (v + 1) / 2
    model_logvar = frac * bcast(np.log(BETAS[tn]), 4) + (1 - frac) * bcast(post_logvar_clipped(tn), 4)
    out = np.zeros(len(tn))
    for i, step in enumerate(tn):
        if step == 0:
            model_mean = x0_hat[i]  # q(x_{-1} | x_0, x0) is the point mass at x0
            ll = direct_loglik(x0[i], model_mean, np.exp(0.5 * model_logvar[i]))
            out[i] = -ll.mean() / math.log(2)
        else:
            tm, tv = bayes_posterior(x0[i], xt[i], ab[i], abp[i], al[i])
            mm, _ = bayes_posterior(x0_hat[i], xt[i], ab[i], abp[i], al[i])
            lv = model_logvar[i]
            kl = 0.5 * (-1 + lv - np.log(tv) + tv / np.exp(lv) + (tm - mm) ** 2 / np.exp(lv))
            out[i] = kl.mean() / math.log(2)
    return out


def test_training_losses_true_noise_gives_zero_mse():
    d = GaussianDiffusion(linear_betas(T), learn_sigma=True)
    x0, noise, t = _train_batch(9, [0, 1, 250, 999])
    v = torch.full_like(noise, 0.3)
    seen = {}

    def model_fn(x, tt):
        seen["x"], seen["t"] = x, tt
        return torch.cat([noise, v], 1)

    terms = d.training_losses(model_fn, x0, t, noise)
    assert float(terms["mse"].abs().max()) == 0.0
    np.testing.assert_allclose(terms["loss"].detach().numpy(), terms["vb"].detach().numpy(), rtol=1e-12)
    ab = bcast(ABAR[t.numpy()], 4)
    np.testing.assert_allclose(seen["x"].numpy(), np.sqrt(ab) * x0.numpy() + np.sqrt(1 - ab) * noise.numpy(), atol=1e-6)
    assert seen["t"].tolist() == t.tolist()
    # with the exact mean, the KL part reduces to the variance mismatch alone
    expected = independent_vb_bits(x0.numpy(), seen["x"].numpy(), noise.numpy(), v.numpy(), t.numpy())
    np.testing.assert_allclose(terms["vb"].detach().numpy(), expected, rtol=1e-3, atol=1e-6)


def test_training_losses_vb_and_mse_against_first_principles():
    d = GaussianDiffusion(linear_betas(T), learn_sigma=True)
    x0, noise, t = _train_batch(10, [0, 0, 1, 2, 30, 400, 999])
    gen = torch.Generator().manual_seed(11)
    eps_model = noise + 0.3 * torch.randn(noise.shape, generator=gen, dtype=torch.float64)
    v = torch.rand(noise.shape, generator=gen, dtype=torch.float64) * 2 - 1
    terms = d.training_losses(lambda x, tt: torch.cat([eps_model, v], 1), x0, t, noise)
    mse = ((noise.numpy() - eps_model.numpy()) ** 2).reshape(len(t), -1).mean(1)
    np.testing.assert_allclose(terms["mse"].numpy(), mse, rtol=1e-12)
    xt = terms["xt"].numpy()
    expected_vb = independent_vb_bits(x0.numpy(), xt, eps_model.numpy(), v.numpy(), t.numpy())
    np.testing.assert_allclose(terms["vb"].numpy(), expected_vb, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(terms["loss"].numpy(), mse + expected_vb, rtol=1e-3, atol=1e-6)
    assert terms["model_output"].shape == (len(t), 4, 3, 3)


def test_vb_gradient_reaches_only_the_variance_channels():
    d = GaussianDiffusion(linear_betas(T), learn_sigma=True)
    x0, noise, t = _train_batch(12, [0, 1, 100, 999])
    c = x0.shape[1]
    gen = torch.Generator().manual_seed(13)
    out = torch.cat(
        [noise + 0.5 * torch.randn(noise.shape, generator=gen, dtype=torch.float64), torch.zeros_like(noise)], 1
    ).requires_grad_(True)
    terms = d.training_losses(lambda x, tt: out, x0, t, noise)
    (g_vb,) = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)
    assert float(g_vb[:, :c].abs().max()) == 0.0
    assert (g_vb[:, c:].abs().flatten(1).max(1).values > 0).all()  # every sample, t = 0 included
    # the total loss: the epsilon channels see exactly the MSE gradient 2 (eps - noise) / D
    (g_loss,) = torch.autograd.grad(terms["loss"].sum(), out)
    dims = noise[0].numel()
    expected = 2 * (out[:, :c].detach().numpy() - noise.numpy()) / dims
    np.testing.assert_allclose(g_loss[:, :c].numpy(), expected, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(g_loss[:, c:].numpy(), g_vb[:, c:].numpy(), rtol=1e-12)


def test_vb_gradient_wrt_v_matches_closed_form():
    """d KL / d v = 0.5 (log beta - log post_var) * 0.5 (1 - var_q / var_p - (dmean)^2 / var_p)."""
    d = GaussianDiffusion(linear_betas(T), learn_sigma=True)
    x0, noise, t = _train_batch(14, [1, 50, 600])
    c = x0.shape[1]
    gen = torch.Generator().manual_seed(15)
    eps_model = noise + 0.2 * torch.randn(noise.shape, generator=gen, dtype=torch.float64)
    v = (torch.rand(noise.shape, generator=gen, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    terms = d.training_losses(lambda x, tt: torch.cat([eps_model, v], 1), x0, t, noise)
    (g,) = torch.autograd.grad(terms["vb"].sum(), v)
    tn = t.numpy()
    xt = terms["xt"].detach().numpy()
    ab, abp, al = bcast(ABAR[tn], 4), bcast(ABAR_PREV[tn], 4), bcast(ALPHAS[tn], 4)
    tm, tv = bayes_posterior(x0.numpy(), xt, ab, abp, al)
    x0_hat = (xt - np.sqrt(1 - ab) * eps_model.numpy()) / np.sqrt(ab)
    mm, _ = bayes_posterior(x0_hat, xt, ab, abp, al)
    lo, hi = bcast(np.log(POST_VAR[tn]), 4), bcast(np.log(BETAS[tn]), 4)
    lv = (v.detach().numpy() + 1) / 2 * hi + (1 - v.detach().numpy()) / 2 * lo
    dkl_dlv = 0.5 * (1 - tv / np.exp(lv) - (tm - mm) ** 2 / np.exp(lv))
    expected = dkl_dlv * 0.5 * (hi - lo) / (noise[0].numel() * math.log(2))
    np.testing.assert_allclose(g.numpy(), expected, rtol=1e-3, atol=1e-9)
    assert c == 2


def test_training_losses_without_learned_sigma():
    d = GaussianDiffusion(linear_betas(T), learn_sigma=False)
    x0, noise, t = _train_batch(16, [0, 10, 999])
    eps_model = noise * 0.5
    terms = d.training_losses(lambda x, tt: eps_model, x0, t, noise)
    assert "vb" not in terms
    np.testing.assert_array_equal(terms["loss"].numpy(), terms["mse"].numpy())
    np.testing.assert_allclose(terms["mse"].numpy(), (0.25 * noise.numpy() ** 2).reshape(3, -1).mean(1), rtol=1e-12)


def test_training_losses_on_a_respaced_process_give_the_model_original_timesteps():
    d = GaussianDiffusion(linear_betas(T), learn_sigma=False).respaced(250)
    kept = adm_kept(T, [250])
    x0, noise, _ = _train_batch(17, [0, 0, 0, 0])
    t = torch.tensor([0, 1, 100, 249])
    seen = {}

    def model_fn(x, tt):
        seen["t"] = tt
        return noise

    terms = d.training_losses(model_fn, x0, t, noise)
    assert seen["t"].tolist() == [kept[i] for i in t.tolist()]
    ab = bcast(ABAR[[kept[i] for i in t.tolist()]], 4)
    np.testing.assert_allclose(terms["xt"].numpy(), np.sqrt(ab) * x0.numpy() + np.sqrt(1 - ab) * noise.numpy(), atol=1e-6)


# ------------------------------------------------------------------------------------------
# samplers on analytic models
# ------------------------------------------------------------------------------------------

MU, S = 0.3, 0.5


def point_mass_eps(mu, visited=None):
    def model_fn(x, t):
        ab = torch.from_numpy(ABAR[t.numpy()]).reshape(-1, *([1] * (x.dim() - 1)))
        if visited is not None:
            visited.append((t.clone(), x.clone()))
        return ((x - ab.sqrt() * mu) / (1 - ab).sqrt()).to(x.dtype)

    return model_fn


def gaussian_eps(mu, s, extra_channels=None):
    """Exact epsilon for data N(mu, s^2) per dimension: E[eps | x_t]."""

    def model_fn(x, t):
        ab = torch.from_numpy(ABAR[t.numpy()]).reshape(-1, *([1] * (x.dim() - 1)))
        eps = (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * s * s + 1 - ab)
        if extra_channels is not None:
            eps = torch.cat([eps, torch.full_like(eps, extra_channels)], 1)
        return eps.to(x.dtype)

    return model_fn


@pytest.mark.parametrize("steps", [1, 2, 10, 50, "ddim25", None])
def test_ddim_point_mass_recovers_mu_and_keeps_eps_constant(steps):
    d = GaussianDiffusion(linear_betas(T), learn_sigma=False)
    mu = torch.tensor([[0.25, -0.6]], dtype=torch.float64)
    noise = RecordingNoise((16, 2), seed=20)
    visited = []
    x = d.sample(point_mass_eps(mu, visited), noise, sampler="ddim", steps=steps)
    np.testing.assert_allclose(x.numpy(), np.broadcast_to(mu.numpy(), (16, 2)), atol=1e-4)
    # visits the respaced timesteps from the top, on the original scale
    if steps is None:
        kept = list(range(T))
    elif isinstance(steps, str):
        kept = [40 * k for k in range(25)]
    else:
        kept = adm_kept(T, [steps])
    # one step visits the last timestep only (pure noise: leandit's documented departure from
    # ADM, which would keep t = 0; see adm_kept)
    assert [int(tt[0]) for tt, _ in visited] == kept[::-1]
    if steps == 1:
        assert len(visited) == 1 and int(visited[0][0][0]) == T - 1
    # deterministic DDIM on a point mass keeps the implied noise fixed: after the first step,
    # x_t = sqrt(abar_t) mu + sqrt(1 - abar_t) e with e the eps implied at x_T = noise()
    t_top, x_top = visited[0]
    np.testing.assert_array_equal(x_top.numpy(), noise.calls[0])
    ab_top = ABAR[int(t_top[0])]
    e = (noise.calls[0] - math.sqrt(ab_top) * mu.numpy()) / math.sqrt(1 - ab_top)
    for tt, xx in visited[1 :: max(1, len(visited) // 20)]:
        ab = ABAR[int(tt[0])]
        np.testing.assert_allclose(xx.numpy(), math.sqrt(ab) * mu.numpy() + math.sqrt(1 - ab) * e, atol=1e-4)


def reference_chain(z_calls, kept, mu, s, sampler, var_kind="large", v=0.0):
    """Float64 reference of the reverse process on the kept timesteps for N(mu, s^2) data
    with the exact epsilon, consuming the recorded noise in order: z_calls[0] is x_T, then
    one draw per step (the last step's draw, if any, is unused)."""
    ab = ABAR[kept]
    abp = np.concatenate([[1.0], ab[:-1]])
    al = ab / abp
    be = 1 - al
    x = z_calls[0]
    n = len(kept)
    for j, i in enumerate(range(n - 1, -1, -1)):
        eps = np.sqrt(1 - ab[i]) * (x - np.sqrt(ab[i]) * mu) / (ab[i] * s * s + 1 - ab[i])
        x0 = (x - np.sqrt(1 - ab[i]) * eps) / np.sqrt(ab[i])
        if sampler == "ddim":
            x = np.sqrt(abp[i]) * x0 + np.sqrt(1 - abp[i]) * eps
            continue
        if i == 0:
            x = x0
            continue
        mean, pvar = bayes_posterior(x0, x, ab[i], abp[i], al[i])
        if var_kind == "large":
            var = be[i]
        elif var_kind == "small":
            var = pvar
        else:  # learned, constant v
            frac = (v + 1) / 2
            var = np.exp(frac * np.log(be[i]) + (1 - frac) * np.log(pvar))
        x = mean + np.sqrt(var) * z_calls[1 + j]
    return x


@pytest.mark.parametrize(
    "sampler, steps, var_kind",
    [("ddpm", None, "large"), ("ddpm", None, "small"), ("ddpm", 50, "large"), ("ddim", 100, None), ("ddim", 10, None)],
)
def test_sampler_paths_match_float64_reference(sampler, steps, var_kind):
    d = GaussianDiffusion(linear_betas(T), learn_sigma=False, fixed_variance=var_kind or "large")
    noise = RecordingNoise((64, 1), seed=21)
    x = d.sample(gaussian_eps(MU, S), noise, sampler=sampler, steps=steps)
    kept = list(range(T)) if steps is None else adm_kept(T, [steps])
    n = len(kept)
    if sampler == "ddpm":
        assert len(noise.calls) in (n, n + 1)
    else:
        assert len(noise.calls) == 1  # eta = 0 draws nothing after x_T
    expected = reference_chain(noise.calls, kept, MU, S, sampler, var_kind or "large")
    np.testing.assert_allclose(x.numpy(), expected, atol=2e-4)


def test_ddpm_learned_sigma_path_matches_reference():
    d = GaussianDiffusion(linear_betas(T), learn_sigma=True)
    noise = RecordingNoise((32, 1), seed=22)
    x = d.sample(gaussian_eps(MU, S, extra_channels=0.4), noise, sampler="ddpm", steps=100)
    expected = reference_chain(noise.calls, adm_kept(T, [100]), MU, S, "ddpm", "learned", v=0.4)
    np.testing.assert_allclose(x.numpy(), expected, atol=2e-4)


def test_ddpm_gaussian_data_moments():
    """DDPM (fixed large variance, 1000 steps) with the exact epsilon samples N(mu, s^2)."""
    d = GaussianDiffusion(linear_betas(T), learn_sigma=False)
    n = 20_000
    x = d.sample(gaussian_eps(MU, S), RecordingNoise((n, 1), seed=23, record=False), sampler="ddpm").numpy().ravel()
    # the discretisation bias of this chain is < 1e-3 (computed in float64); the rest is
    # Monte-Carlo error: 5 standard errors
    assert abs(x.mean() - MU) < 5 * S / math.sqrt(n) + 1e-3
    assert abs(x.std() - S) < 5 * S / math.sqrt(2 * n) + 1e-3


@pytest.mark.parametrize("steps, std_tol", [(50, 0.035), (100, 0.018)])
def test_ddim_gaussian_data_moments(steps, std_tol):
    """DDIM maps x_T affinely; on normal quantiles its output's mean and std are those of the
    sampled distribution with no Monte-Carlo error. DDIM is first order: the std deficit
    (about 0.028 at 50 steps, 0.014 at 100) halves as the steps double."""
    d = GaussianDiffusion(linear_betas(T), learn_sigma=False)
    n = 4001
    z = torch.from_numpy(norm.ppf((np.arange(n) + 0.5) / n)).reshape(n, 1)
    z = (z - z.mean()) / z.std(unbiased=False)  # exactly mean 0, std 1
    x = d.sample(gaussian_eps(MU, S), lambda: z.clone(), sampler="ddim", steps=steps).numpy().ravel()
    assert abs(x.mean() - MU) < 2e-3
    assert abs(x.std() - S) < std_tol
    assert x.std() < S  # DDIM under-disperses at few steps


def test_ddim_std_error_is_first_order():
    d = GaussianDiffusion(linear_betas(T), learn_sigma=False)
    z = torch.tensor([[-2.0], [2.0]], dtype=torch.float64)
    spread = {}
    for steps in (25, 50, 100, 200):
        x = d.sample(gaussian_eps(MU, S), lambda: z.clone(), sampler="ddim", steps=steps).numpy().ravel()
        spread[steps] = S - (x[1] - x[0]) / 4  # std deficit of the affine map
    for a, b in ((25, 50), (50, 100), (100, 200)):
        assert 0.4 < spread[b] / spread[a] < 0.6


def test_ddim_eta1_equals_ddpm_with_posterior_variance():
    """DDIM with eta = 1 is DDPM with the true posterior variance (Song et al. 2021)."""
    d = GaussianDiffusion(linear_betas(T), learn_sigma=False, fixed_variance="small")
    a = d.sample(gaussian_eps(MU, S), RecordingNoise((64, 1), seed=24), sampler="ddim", steps=50, eta=1.0)
    b = d.sample(gaussian_eps(MU, S), RecordingNoise((64, 1), seed=24), sampler="ddpm", steps=50)
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


def test_ddim_eta_is_stochastic_and_eta0_deterministic():
    d = GaussianDiffusion(linear_betas(T), learn_sigma=False)
    a = d.sample(gaussian_eps(MU, S), RecordingNoise((8, 1), seed=25), sampler="ddim", steps=10)
    b = d.sample(gaussian_eps(MU, S), RecordingNoise((8, 1), seed=25), sampler="ddim", steps=10)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    noise = RecordingNoise((8, 1), seed=25)
    c = d.sample(gaussian_eps(MU, S), noise, sampler="ddim", steps=10, eta=0.5)
    assert len(noise.calls) > 1 and np.abs(c.numpy() - a.numpy()).max() > 1e-3


def test_sample_clip_denoised_keeps_output_in_range():
    d = GaussianDiffusion(linear_betas(T), learn_sigma=False)
    far = torch.tensor([[3.0]], dtype=torch.float64)  # point mass outside [-1, 1]
    x = d.sample(point_mass_eps(far), RecordingNoise((8, 1), seed=26), sampler="ddim", steps=10, clip_denoised=True)
    np.testing.assert_allclose(x.numpy(), np.ones((8, 1)), atol=1e-4)


def test_unknown_sampler_raises():
    d = GaussianDiffusion(linear_betas(T), learn_sigma=False)
    with pytest.raises(ValueError):
        d.sample(gaussian_eps(MU, S), RecordingNoise((2, 1), seed=0), sampler="euler")
