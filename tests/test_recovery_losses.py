"""Masked RepKD, its weight schedule, and logits KD against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from leandit.compress.recovery import hidden_state_loss, outlier_mask, repkd_loss, repkd_weight
from leandit.diffusion import GaussianDiffusion, LinearFlow
from leandit.diffusion.gaussian import normal_kl


def _planted() -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """Two samples of 8 tokens x 16 channels, values in [-1, 1], with massive activations
    planted at known places (the second sample on a 100x larger scale)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 8, 16, generator=gen, dtype=torch.float64) * 2 - 1
    x[1] *= 100
    planted = [(0, 3, 5), (0, 6, 1), (1, 0, 9)]
    x[0, 3, 5], x[0, 6, 1], x[1, 0, 9] = 60.0, -45.0, 9000.0
    return x, planted


def test_the_mask_drops_exactly_the_activations_beyond_k_std_of_their_own_sample():
    x, planted = _planted()
    for k in (2.0, 4.0):
        keep = outlier_mask(x, k)
        for n in range(2):  # an independent computation per sample (population std)
            values = x[n].numpy().ravel()
            expected = np.abs(values - values.mean()) <= k * values.std()
            assert np.array_equal(keep[n].numpy().ravel(), expected)
        dropped = {tuple(i) for i in (~keep).nonzero().tolist()}
        assert dropped == set(planted)  # ordinary values in [-1, 1] (x100) are never within reach of k std
    # A threshold so low that ordinary values go too.
    assert (~outlier_mask(x, 0.1)).sum() > 100


def test_masked_repkd_averages_the_squared_error_where_both_are_ordinary():
    teacher, _ = _planted()
    student = teacher.clone() + 0.5
    student[0, 1, 2] = -80.0  # an outlier of the student only: dropped too
    loss, dropped = hidden_state_loss(student, teacher, k=2.0)
    both = (outlier_mask(student, 2.0) & outlier_mask(teacher, 2.0)).numpy()
    diff = (student - teacher).numpy()
    per_sample = [float((diff[n][both[n]] ** 2).mean()) for n in range(2)]
    assert loss.item() == pytest.approx(np.mean(per_sample), rel=1e-6)
    assert dropped.item() == pytest.approx(4 / teacher.numel())
    plain, none_dropped = hidden_state_loss(student, teacher, k=None)
    assert plain.item() == pytest.approx(float(((student - teacher) ** 2).mean()))
    assert none_dropped.item() == 0
    assert plain.item() > 50 * loss.item()  # one massive activation dominates plain RepKD


def test_repkd_gradient_flows_into_the_student_only_and_averages_layers():
    teacher = [torch.randn(3, 4, 8, dtype=torch.float64) for _ in range(2)]
    student = [(t + 0.1 * torch.randn_like(t)).requires_grad_() for t in teacher]
    loss, _ = repkd_loss(student, teacher, k=4.0)
    expected = sum(hidden_state_loss(s, t, 4.0)[0] for s, t in zip(student, teacher)) / 2
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)
    with pytest.raises(ValueError, match="one teacher hidden state per student layer"):
        repkd_loss(student, teacher[:1])


def test_repkd_weight_decays_linearly_from_its_start_to_zero_at_the_last_step():
    assert repkd_weight(0, 100, 1e-2) == pytest.approx(1e-2)
    assert repkd_weight(99, 100, 1e-2) == 0
    assert repkd_weight(33, 67, 1e-2) == pytest.approx(0.5e-2)
    values = [repkd_weight(s, 10, 1.0) for s in range(10)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert repkd_weight(0, 1, 1e-2) == 0  # a one-step run divides by nothing
    assert repkd_weight(500, 100, 1e-2) == 0  # past the end stays at 0


def test_logits_kd_of_a_learned_sigma_model_is_the_epsilon_mse_plus_the_variance_kl():
    diffusion = GaussianDiffusion.dit(learn_sigma=True)
    gen = torch.Generator().manual_seed(1)
    xt = torch.randn(4, 1, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    teacher = torch.randn(4, 2, 8, 8, generator=gen, dtype=torch.float64).clamp(-1, 1)
    student = (teacher + 0.3 * torch.randn(4, 2, 8, 8, generator=gen, dtype=torch.float64)).clamp(-1, 1).requires_grad_()
    terms = diffusion.distillation_losses(student, teacher, xt, t)
    mse = ((student[:, :1] - teacher[:, :1]) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(terms["kd_mse"], mse)
    # Independent KL: both Gaussians from the diffusion tables, the student's mean frozen.
    tp = diffusion.p_mean_variance(teacher, xt, t)
    sp = diffusion.p_mean_variance(torch.cat([student[:, :1].detach(), student[:, 1:]], 1), xt, t)
    kl = normal_kl(tp.mean, tp.log_variance, sp.mean, sp.log_variance).mean(dim=(1, 2, 3)) / math.log(2)
    assert torch.allclose(terms["kd_kl"], kl) and torch.allclose(terms["kd"], mse + kl)
    # The KL trains only the variance head; identical outputs give zero KD.
    (grad,) = torch.autograd.grad(terms["kd_kl"].sum(), student)
    assert grad[:, :1].abs().max() == 0 and grad[:, 1:].abs().max() > 0
    same = diffusion.distillation_losses(teacher, teacher, xt, t)
    assert same["kd"].abs().max() < 1e-12


def test_logits_kd_of_fixed_sigma_and_flow_models_is_the_prediction_mse():
    xt = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([5, 50, 500])
    student, teacher = torch.randn(3, 8, 8, 8, dtype=torch.float64), torch.randn(3, 8, 8, 8, dtype=torch.float64)
    expected = ((student[:, :4] - teacher[:, :4]) ** 2).mean(dim=(1, 2, 3))
    fixed = GaussianDiffusion.dit(learn_sigma=False).distillation_losses(student[:, :4], teacher[:, :4], xt, t)
    assert torch.allclose(fixed["kd"], expected) and "kd_kl" not in fixed
    flow = LinearFlow().distillation_losses(student, teacher, xt, torch.rand(3, dtype=torch.float64))
    assert torch.allclose(flow["kd"], expected)  # SiT's unused sigma channels are left out
