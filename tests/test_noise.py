"""Reproducible randomness: per-image sampling noise and the per-step global-batch draw."""

from __future__ import annotations

import math

import pytest
import torch

from leandit.diffusion import PerSampleNoise, StepRandom, mix_seed

# ------------------------------------------------------------------------------------------
# mix_seed
# ------------------------------------------------------------------------------------------


def test_mix_seed_deterministic_in_range_and_order_sensitive():
    assert mix_seed(0, 1) == mix_seed(0, 1)
    assert mix_seed(1, 2) != mix_seed(2, 1)
    assert mix_seed(5) != mix_seed(5, 0) != mix_seed(0, 5)
    for parts in [(0,), (0, 0), (2**64 - 1, 3), (-1, 7), (123456789, 10**12)]:
        s = mix_seed(*parts)
        assert isinstance(s, int) and 0 <= s < 2**63
    # torch accepts it as a seed
    torch.Generator().manual_seed(mix_seed(2**64 - 1, 2**64 - 1))


def test_mix_seed_has_no_collisions_on_a_grid():
    seeds = {mix_seed(s, i) for s in range(64) for i in range(256)}
    assert len(seeds) == 64 * 256
    # and (seed, index) is not confused with (seed, step) pairs shifted by one
    assert mix_seed(0, 1) != mix_seed(1, 0)


def test_mix_seed_spreads_bits():
    # neighbouring inputs flip about half of the 63 output bits
    flips = [bin(mix_seed(7, i) ^ mix_seed(7, i + 1)).count("1") for i in range(200)]
    assert 25 < sum(flips) / len(flips) < 38


# ------------------------------------------------------------------------------------------
# PerSampleNoise
# ------------------------------------------------------------------------------------------


def test_per_sample_noise_is_independent_of_batch_composition():
    shape = (2, 3, 3)
    whole = PerSampleNoise(11, range(8))
    halves = [PerSampleNoise(11, range(0, 4)), PerSampleNoise(11, range(4, 8))]
    shuffled_order = [5, 2, 7, 0]
    shuffled = PerSampleNoise(11, shuffled_order)
    for _ in range(3):  # the stream stays aligned over successive calls
        a = whole.randn(shape)
        b = torch.cat([h.randn(shape) for h in halves])
        c = shuffled.randn(shape)
        assert a.shape == (8, *shape) and a.dtype == torch.float32
        assert torch.equal(a, b)
        assert torch.equal(a[shuffled_order], c)
    single = PerSampleNoise(11, [6])
    first = single.randn(shape)
    assert torch.equal(first[0], PerSampleNoise(11, range(8)).randn(shape)[6])


def test_per_sample_noise_successive_calls_images_and_seeds_differ():
    n = PerSampleNoise(0, [0, 1])
    a, b = n.randn((64,)), n.randn((64,))
    assert not torch.allclose(a, b)  # fresh noise at each call
    assert not torch.allclose(a[0], a[1])  # different images
    c = PerSampleNoise(1, [0, 1]).randn((64,))
    assert not torch.allclose(a, c)  # different seeds
    assert torch.equal(PerSampleNoise(0, [0, 1]).randn((64,)), a)  # reproducible


def test_per_sample_noise_is_standard_normal():
    x = PerSampleNoise(3, range(50)).randn((400,)).double()
    n = x.numel()
    assert abs(float(x.mean())) < 5 / math.sqrt(n)
    assert abs(float(x.std()) - 1) < 5 / math.sqrt(2 * n)
    # images are uncorrelated
    corr = torch.corrcoef(x)
    off = corr - torch.eye(50, dtype=torch.float64)
    assert float(off.abs().max()) < 5 / math.sqrt(400)


def test_per_sample_noise_device_and_shape_types():
    n = PerSampleNoise(0, [3, 4], device="cpu")
    assert n.randn([2, 2]).device.type == "cpu"
    assert n.randn(torch.Size([1, 2])).shape == (2, 1, 2)


# ------------------------------------------------------------------------------------------
# StepRandom
# ------------------------------------------------------------------------------------------


def _draws(seed, step, global_batch, rank, world):
    r = StepRandom(seed, step, global_batch, rank, world, "cpu")
    # a training step's calls, in order: noise, timesteps, label-drop uniforms
    return r.randn(2, 3), r.randint(0, 1000), r.rand(), r.randn()


@pytest.mark.parametrize("world", [1, 2, 4])
def test_step_random_slices_concatenate_to_the_single_process_draw(world):
    global_batch = 8
    single = _draws(5, 17, global_batch, 0, 1)
    parts = [_draws(5, 17, global_batch, rank, world) for rank in range(world)]
    for k, full in enumerate(single):
        local = [p[k] for p in parts]
        assert all(x.shape[0] == global_batch // world for x in local)
        assert torch.equal(torch.cat(local), full)
    assert single[0].shape == (8, 2, 3) and single[1].shape == (8,) and single[2].shape == (8,)
    assert single[1].dtype == torch.long
    assert int(single[1].min()) >= 0 and int(single[1].max()) < 1000
    assert float(single[2].min()) >= 0.0 and float(single[2].max()) < 1.0


def test_step_random_rank_owns_its_rows():
    full = StepRandom(0, 3, 12, 0, 1, "cpu").randn(5)
    for rank in range(3):
        part = StepRandom(0, 3, 12, rank, 3, "cpu").randn(5)
        assert torch.equal(part, full[4 * rank : 4 * rank + 4])


def test_step_random_steps_and_seeds_differ_and_repeat():
    a = StepRandom(0, 1, 8, 0, 1, "cpu").randn(4)
    assert torch.equal(a, StepRandom(0, 1, 8, 0, 1, "cpu").randn(4))
    assert not torch.allclose(a, StepRandom(0, 2, 8, 0, 1, "cpu").randn(4))
    assert not torch.allclose(a, StepRandom(1, 1, 8, 0, 1, "cpu").randn(4))
    r = StepRandom(0, 1, 8, 0, 1, "cpu")
    assert not torch.allclose(r.rand(), r.rand())  # successive calls advance the stream


@pytest.mark.parametrize("global_batch, world", [(6, 4), (7, 2), (3, 4)])
def test_step_random_indivisible_batch_raises(global_batch, world):
    with pytest.raises(ValueError):
        StepRandom(0, 0, global_batch, 0, world, "cpu")


def test_step_random_randint_is_uniform():
    x = StepRandom(9, 0, 20_000, 0, 1, "cpu").randint(0, 10)
    counts = torch.bincount(x, minlength=10).double()
    expected = 2000.0
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 33.7  # 9 degrees of freedom, p = 1e-4
