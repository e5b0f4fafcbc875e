"""The paper's baselines on constructed models whose right answer is known, and the shared
calibration loss."""

from __future__ import annotations

import pytest
import torch

from leandit.compress.depth import (
    calibration_loss,
    explicit,
    global_scheme,
    make_calibration_set,
    oracle,
    oracle_kept,
    parse_scheme,
    random_masks_losses,
    random_method,
    score_method,
    select_by_scores,
)
from leandit.compress.depth.calibration import calibration_indices
from leandit.data import digits_dataset
from leandit.models.blocks import running_blocks

from conftest import randomize_, tiny_model

IDENTITIES = (1, 4)  # blocks made exact identities
BREAKER = 3  # a block that wrecks the output


@pytest.fixture(scope="module")
def constructed():
    """6 blocks with small random weights; blocks 1 and 4 are exact identities (adaLN-Zero
    gates at zero) and block 3 has a huge MLP gate."""
    model = randomize_(tiny_model(depth=6), std=0.15, seed=1)
    with torch.no_grad():
        for i in IDENTITIES:
            model.blocks[i].adaLN_modulation[-1].weight.zero_()
            model.blocks[i].adaLN_modulation[-1].bias.zero_()
        d = model.config.hidden_size
        model.blocks[BREAKER].adaLN_modulation[-1].bias[5 * d :] += 40.0  # gate_mlp
    calibration = make_calibration_set(model, digits_dataset(), size=48, seed=0)
    return model, calibration


def test_calibration_set_is_fixed_and_spans_all_timesteps():
    model = tiny_model()
    a = make_calibration_set(model, digits_dataset(), size=100, seed=3)
    b = make_calibration_set(model, digits_dataset(), size=100, seed=3)
    assert all(torch.equal(u, v) for u, v in zip((a.xt, a.t, a.y, a.target), (b.xt, b.t, b.y, b.target)))
    assert sorted(a.t.tolist()) == [int((i + 0.5) * 10) for i in range(100)]  # midpoints of 100 slices of 1000
    flow = make_calibration_set(tiny_model(objective="flow"), digits_dataset(), size=10)
    assert sorted(flow.t.tolist()) == pytest.approx([(i + 0.5) / 10 for i in range(10)])


class ClassByClass(torch.utils.data.Dataset):
    """Like latent shards: sorted by class, two flip variants per image side by side."""

    variants = 2

    def __len__(self):
        return 400

    def __getitem__(self, index):
        image, variant = divmod(index, 2)
        return torch.full((1, 8, 8), float(image * 10 + variant)), image // 20  # 20 images per class


def test_calibration_images_are_drawn_across_classes_one_variant_each():
    calibration = make_calibration_set(tiny_model(), ClassByClass(), size=50, seed=0)
    assert len(set(calibration.y.tolist())) >= 8  # not the first class twice
    indices = calibration_indices(ClassByClass(), 50, seed=0)
    assert len(set(indices)) == 50 and all(i % 2 == 0 for i in indices)
    with pytest.raises(ValueError, match="the data has 200 images, fewer than the calibration size 300"):
        calibration_indices(ClassByClass(), 300)


def test_calibration_loss_is_the_mse_of_the_kept_blocks_model(constructed):
    model, calibration = constructed
    with torch.no_grad(), running_blocks(model, [0, 2, 5]):
        out = model(calibration.xt, calibration.t, calibration.y)[:, :1]
    expected = ((out - calibration.target) ** 2).mean().item()
    assert calibration_loss(model, calibration, [0, 2, 5], batch_size=7) == pytest.approx(expected, rel=1e-5)
    assert len(model.blocks) == 6  # restored
    # Removing an identity block changes nothing.
    assert calibration_loss(model, calibration, [0, 2, 3, 4, 5]) == pytest.approx(calibration_loss(model, calibration), rel=1e-6)


@pytest.mark.parametrize("method", ["shortgpt", "fluxlite"])
def test_identity_blocks_are_the_first_removed_by_shortgpt_and_fluxlite(method, constructed):
    model, calibration = constructed
    decision = score_method(method, model, calibration, global_scheme(6, 4), progress=False)
    assert [decision.scores[i] for i in IDENTITIES] == pytest.approx([0.0, 0.0], abs=1e-6)
    assert min(s for i, s in enumerate(decision.scores) if i not in IDENTITIES) > 1e-6
    assert decision.removed == list(IDENTITIES)


def test_shortgpt_block_influence_is_one_minus_cosine(constructed):
    model, calibration = constructed
    captured = {}
    hook = model.blocks[2].register_forward_hook(lambda m, a, o: captured.setdefault("io", []).append((a[0], o)))
    scores = score_method("shortgpt", model, calibration, global_scheme(6, 3), progress=False).scores
    hook.remove()
    x_in = torch.cat([a for a, _ in captured["io"]])
    x_out = torch.cat([o for _, o in captured["io"]])
    cos = (x_in * x_out).sum(-1) / (x_in.norm(dim=-1) * x_out.norm(dim=-1))
    assert scores[2] == pytest.approx((1 - cos).mean().item(), rel=1e-5)


def test_sensitivity_keeps_the_block_that_breaks_the_output(constructed):
    model, calibration = constructed
    decision = score_method("sensitivity", model, calibration, global_scheme(6, 1), progress=False)
    assert decision.kept == [BREAKER]
    full = calibration_loss(model, calibration)
    assert decision.scores[BREAKER] == pytest.approx(calibration_loss(model, calibration, [0, 1, 2, 4, 5]) - full, rel=1e-6)
    assert decision.scores[1] == pytest.approx(0.0, abs=1e-6)


def test_score_methods_choose_within_each_group():
    assert select_by_scores([0.1, 0.5, 0.3, 0.3, 0.9, 0.0], parse_scheme("1:2", 6)) == [1, 2, 4]
    assert select_by_scores([0.1, 0.5, 0.3, 0.3, 0.9, 0.0], parse_scheme("2:4,1:2", 6)) == [1, 2, 4]
    assert select_by_scores([0.1, 0.5, 0.3, 0.3, 0.9, 0.0], global_scheme(6, 3)) == [1, 2, 4]


def test_oracle_reproduces_the_papers_28_to_14_list():
    assert oracle_kept(28, 14) == [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27]
    assert oracle_kept(28, 7)[0] == 0 and oracle_kept(28, 7)[-1] == 27 and len(oracle_kept(28, 7)) == 7
    assert oracle_kept(12, 6) == [0, 2, 4, 7, 9, 11]
    assert oracle(parse_scheme("1:2", 28)).kept == oracle_kept(28, 14)  # it fits 1:2
    assert "note" not in oracle(parse_scheme("1:2", 12)).details
    uneven = oracle(parse_scheme("2:4,1:8", 12))  # [0, 6, 11]: the first group keeps only one
    assert uneven.kept == [0, 6, 11] and uneven.details["note"].startswith("the oracle spreads")


def test_random_masks_are_reproducible_and_the_picks_are_min_and_median(constructed):
    model, calibration = constructed
    scheme = global_scheme(6, 3)
    masks, losses = random_masks_losses(model, calibration, scheme, 30, seed=5, progress=False)
    masks2, losses2 = random_masks_losses(model, calibration, scheme, 30, seed=5, progress=False)
    assert torch.equal(masks, masks2) and losses == losses2
    lowest = random_method(model, calibration, scheme, "min-loss", 30, seed=5, progress=False)
    assert lowest.details["calibration_loss"] == min(losses)
    median = random_method(model, calibration, scheme, "median-loss", 30, seed=5, progress=False)
    assert median.details["calibration_loss"] == sorted(losses)[14]
    first = random_method(model, calibration, parse_scheme("1:2", 6), "first", seed=2, progress=False)
    assert len(first.kept) == 3 and all(len(g["kept"]) == 1 for g in first.groups)


def test_explicit_indices_are_validated():
    assert explicit([4, 0, 2], 6).kept == [0, 2, 4]
    with pytest.raises(ValueError, match="out of range"):
        explicit([0, 6], 6)
    with pytest.raises(ValueError, match="repeat"):
        explicit([1, 1], 6)
    with pytest.raises(ValueError, match="do not fit scheme 1:2"):
        explicit([0, 1, 2], 6, parse_scheme("1:2", 6))
