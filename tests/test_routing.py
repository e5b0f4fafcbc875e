"""DiffCR token routing (leandit.compress.routing): a routed block computes exactly the dense
block on the tokens it keeps (gathered independently here, in spatial order) and leaves the
others bit-identical, on leandit DiT blocks and on diffusers DiT and PixArt blocks; the kept
tokens are the router's top k; the ratios and routers get the gradients finite differences
and the straight-through formula give; bins, capacities and interpolation at their edges;
both budget losses and the MAC count against hand computations; the frozen schedule survives
the model folder and equals the trained model's hard routing; bad inputs are one-line errors.

Models are tiny random DiTs (hidden 32, 4 heads, 16 tokens, 2-3 blocks); building a
RoutedModel measures every block with torch's FLOP counter (~0.1-0.3 s a block), so models
are built once per module where tests only read them."""

from __future__ import annotations

import copy
import json
import math
from fractions import Fraction

import pytest
import torch

import leandit
from leandit.backbones import backbone
from leandit.compress.recovery import RecoverySettings
from leandit.compress.routing import RouteGroup, RoutePlan, RoutedBlock, RoutedModel, RoutingSettings
from leandit.compress.routing.job import RouteJob, RoutingTraining
from leandit.compress.routing.ratios import (
    bin_pair,
    capacity,
    clamp_ratios,
    interpolation_weight,
    mac_budget_loss,
    nearest_bin,
    ratio_budget_loss,
    regions_of,
)
from leandit.models.blocks import block_list

from conftest import randomize_, tiny_model

PLAIN = RecoverySettings.from_mix("plain")
D, HEADS, T = 32, 4, 16  # the tiny DiTs: width 32, 4 heads of 8, MLP 128, 16 tokens


def dense_dit(depth: int = 3, seed: int = 0, **overrides) -> leandit.DiT:
    return randomize_(tiny_model(hidden_size=D, num_heads=HEADS, depth=depth, **overrides), std=0.2, seed=seed)


def inputs(n: int = 6, seed: int = 0, t: list[int] | None = None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=gen)
    t = torch.tensor(t) if t is not None else torch.linspace(3, 990, n).long()
    y = torch.randint(0, 10, (n,), generator=gen)
    return x, t, y


def random_routers_(model: RoutedModel, seed: int = 1, std: float = 1.0) -> RoutedModel:
    """Router weights that rank tokens differently in every block (fresh ones are random too,
    but from the global generator)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.routed_blocks:
            block.router.weight.copy_(torch.randn(block.router.weight.shape, generator=gen) * std)
    return model


def one_line(err) -> str:
    text = str(err.value)
    assert text and "\n" not in text, text
    return text


@pytest.fixture(scope="module")
def routed3() -> RoutedModel:
    """A 3-block routed DiT (4 regions, 10 bins) with random routers: copy before changing it."""
    return random_routers_(RoutedModel(dense_dit(3)))


def fresh(model: RoutedModel) -> RoutedModel:
    return copy.deepcopy(model)


# -- 1. one block: gather, the block on the kept tokens, scatter ---------------------------

def captured_call(model, index: int, x, t, cond):
    """(args, kwargs) of the call of block `index` in a forward of the plain model (its real
    inputs: the residual stream there, the conditioning, diffusers' text and masks)."""
    calls = {}
    block = block_list(model)[index]
    handle = block.register_forward_pre_hook(lambda m, a, kw: calls.setdefault("call", (a, dict(kw))) and None,
                                             with_kwargs=True)
    try:
        with torch.no_grad():
            backbone(model).predict(x, t, cond)
    finally:
        handle.remove()
    args, kwargs = calls["call"]
    if not args:  # diffusers may pass the tokens by name
        kwargs = dict(kwargs)
        args = (kwargs.pop("hidden_states"),)
    return args[0], args[1:], kwargs


def subset(value, images: torch.Tensor, n: int):
    """The images' part of a block input whose first dimension is the batch (else unchanged)."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
        return value[images]
    return value


def top_k_spatial(x: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
    """(n, k) token indices of the k largest router logits x @ w per image, ascending: by a
    full descending sort (not topk)."""
    logits = (x.double() @ weight.double().T).squeeze(-1)  # (n, T)
    order = logits.argsort(dim=1, descending=True)[:, :k]
    return order.sort(dim=1).values


def by_hand(block, x, args, kwargs, images, index):
    """The dense block on exactly the kept tokens x[images][i, index[i]] of those images, with
    their conditioning; scattered into a copy of their input."""
    n = x.shape[0]
    xs = x[images]
    rows = torch.arange(len(images)).unsqueeze(1)
    kept = xs[rows, index]  # (m, k, D) advanced indexing
    a = tuple(subset(v, images, n) for v in args)
    kw = {k: subset(v, images, n) for k, v in kwargs.items()}
    with torch.no_grad():
        y = block(kept, *a, **kw)
    out = xs.clone()
    out[rows, index] = y
    return out


def routed_block(block, seed: int = 3, **options) -> RoutedBlock:
    routed = RoutedBlock(block, **options)
    with torch.no_grad():
        routed.router.weight.copy_(torch.randn(routed.router.weight.shape, generator=torch.Generator().manual_seed(seed)))
    return routed


def family_model(family: str, depth: int = 2):
    from diffusers_models import tiny_diffusers_dit, tiny_pixart

    if family == "leandit":
        return dense_dit(depth)
    if family == "dit":
        return tiny_diffusers_dit(depth=depth, num_attention_heads=HEADS, attention_head_dim=D // HEADS)
    return tiny_pixart(depth=depth, num_attention_heads=HEADS, attention_head_dim=D // HEADS, cross_attention_dim=D)


def family_inputs(family: str, n: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=gen)
    t = torch.tensor([999, 700, 300, 5, 500, 120][:n])
    if family != "pixart":
        return x, t, torch.randint(0, 10, (n,), generator=gen)
    length = 7
    mask = torch.zeros(n, length, dtype=torch.long)
    for i in range(n):
        mask[i, : 2 + i] = 1
    return x, t, {"text": torch.randn(n, length, 16, generator=gen), "text_mask": mask}


FAMILIES = ("leandit", "dit", "pixart")


@pytest.mark.parametrize("family", FAMILIES)
def test_a_routed_block_at_all_tokens_is_the_dense_block_bit_for_bit(family):
    model = family_model(family)
    x, args, kwargs = captured_call(model, 1, *family_inputs(family))
    block = block_list(model)[1]
    with torch.no_grad():
        dense = block(x, *args, **kwargs)
    for multiplier in ("straight-through",):
        routed = routed_block(block, multiplier=multiplier, scale="update" if family != "leandit" else "mlp")
        routed.plan = RoutePlan([RouteGroup(None, [(x.shape[1], None)])])
        with torch.no_grad():  # inference: the block itself, no gather
            assert torch.equal(routed(x, *args, **kwargs), dense)
        # Training (gradients on): every token gathered, the multiplier is exactly 1; the same shapes.
        out = routed(x, *args, **kwargs)
        assert out.requires_grad and torch.equal(out, dense)
        # Two mixed capacities that are both N with weights 0.25 / 0.75: exactly the block again.
        routed.plan = RoutePlan([RouteGroup(None, [(x.shape[1], torch.tensor(0.25)), (x.shape[1], torch.tensor(0.75))])])
        assert torch.equal(routed(x, *args, **kwargs), dense)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("k", [1, 5, 11])
def test_kept_tokens_are_the_block_on_exactly_those_tokens_and_skipped_ones_pass_bit_identical(family, k):
    model = family_model(family)
    x, args, kwargs = captured_call(model, 1, *family_inputs(family))
    n = x.shape[0]
    block = block_list(model)[1]
    routed = routed_block(block, scale="update" if family == "pixart" else "mlp")
    routed.plan = RoutePlan([RouteGroup(None, [(k, None)])])
    routed.record = True
    for grad in (False, True):  # inference, and training with the straight-through multiplier (value 1)
        with torch.set_grad_enabled(grad):
            out = routed(x, *args, **kwargs)
        index = top_k_spatial(x, routed.router.weight, k)
        ((images, kept),) = routed.kept
        assert images is None and torch.equal(kept, index)  # the router's top k, in spatial order
        skipped = torch.ones(n, x.shape[1], dtype=torch.bool)
        skipped[torch.arange(n).unsqueeze(1), index] = False
        assert torch.equal(out[skipped], x[skipped])  # skipped tokens: their input, bit for bit
        # Kept tokens: the dense block on them alone, same batch and shapes: bit-identical.
        assert torch.equal(out.detach(), by_hand(block, x, args, kwargs, torch.arange(n), index))
        assert not torch.equal(out[~skipped], x[~skipped])  # and the block changed them


@pytest.mark.parametrize("family", FAMILIES)
def test_image_groups_run_each_subset_with_its_own_conditioning(family):
    """Two groups (images 1, 3 at k = 6; images 0, 2 at k = 12), as regions make them: each
    image equals the dense block on its kept tokens with its own label / text / timestep."""
    model = family_model(family)
    x, args, kwargs = captured_call(model, 1, *family_inputs(family))
    block = block_list(model)[1]
    routed = routed_block(block, scale="update")
    first, second = torch.tensor([1, 3]), torch.tensor([0, 2])
    routed.plan = RoutePlan([RouteGroup(first, [(6, None)]), RouteGroup(second, [(12, None)])])
    routed.record = True
    with torch.no_grad():
        out = routed(x, *args, **kwargs)
    recorded = {tuple(images.tolist()): kept for images, kept in routed.kept}
    for images, k in ((first, 6), (second, 12)):
        index = top_k_spatial(x[images], routed.router.weight, k)
        assert torch.equal(recorded[tuple(images.tolist())], index)
        # A sub-batch of 2 images is what both computations run: bit-identical.
        assert torch.equal(out[images], by_hand(block, x, args, kwargs, images, index))
    if family == "pixart":
        # The cross-attention read these images' text: another image's text gives another result.
        text = kwargs["encoder_hidden_states"]
        swapped = {**kwargs, "encoder_hidden_states": text[[1, 0, 3, 2]]}
        wrong = by_hand(block, x, args, swapped, first, top_k_spatial(x[first], routed.router.weight, 6))
        assert (wrong - out[first]).abs().max() > 1e-3


# -- 2. the model: dense at ratio 1, top-k per image, groups by timestep region ------------

def test_at_ratio_one_the_routed_model_is_the_dense_model(routed3):
    model = fresh(routed3)
    dense = model.inner
    x, t, y = inputs(6, t=[7] * 6)  # one region: one group, the dense batch's shapes
    with torch.no_grad():
        ref = dense.eval()(x, t, y)
        assert torch.equal(model.eval()(x, t, y), ref)
    # Training: both bins around 1.0 run (15 and 16 tokens) and are mixed with weights 0 and 1.
    model.train()
    with model.recording():
        out = model(x, t, y)
    assert torch.equal(out, ref)
    assert [tuple(kept.shape) for _, kept in model.routed_blocks[0].kept] == [(6, 15), (6, 16)]
    # Over several regions the images run as sub-batches: the same values up to float rounding
    # (the blocks' matmuls see 1-2 images at a time instead of 6).
    x, t, y = inputs(6)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x, t, y), dense(x, t, y), rtol=1e-5, atol=1e-6)


def set_ratios_(model: RoutedModel, values) -> RoutedModel:
    with torch.no_grad():
        model.ratios.copy_(torch.as_tensor(values, dtype=model.ratios.dtype).expand_as(model.ratios))
    return model


def test_every_block_keeps_the_k_best_scored_tokens_of_its_input_in_spatial_order(routed3):
    model = set_ratios_(fresh(routed3), [[0.3, 0.5, 0.8, 1.0], [0.1, 0.6, 0.4, 0.2], [0.9, 0.7, 0.3, 0.5]]).eval()
    x, t, y = inputs(8)
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach())) for b in model.routed_blocks]
    with torch.no_grad(), model.recording():
        model(x, t, y)
    for h in hooks:
        h.remove()
    regions = regions_of(t, 4, "diffusion")
    schedule = model.hard_schedule()
    for layer, (block, x_in) in enumerate(zip(model.routed_blocks, seen)):
        for images, kept in block.kept:
            g = int(regions[images[0]])
            assert (regions[images] == g).all()
            assert kept.shape == (len(images), int(schedule[layer, g]))
            assert torch.equal(kept, top_k_spatial(x_in[images], block.router.weight, kept.shape[1]))
        covered = torch.cat([images for images, _ in block.kept]).sort().values
        assert torch.equal(covered, torch.arange(8))  # every image ran once, in its region's group


def test_a_mixed_batch_gives_each_region_what_its_images_alone_give(routed3):
    """Images in 4 timestep regions, each region its own schedule: every image's output and
    kept tokens are those of its region's images run alone (which makes one group)."""
    model = fresh(routed3).double().eval()  # float64: the sub-batches' rounding far below the check
    model.set_schedule([[3, 8, 12, 16], [5, 2, 16, 9], [16, 7, 1, 4]])
    t = [990, 5, 300, 620, 260, 10, 749, 750]  # regions 3 0 1 2 1 0 2 3
    x, t, y = inputs(8, t=t)
    x = x.double()
    regions = regions_of(t, 4, "diffusion")
    assert regions.tolist() == [3, 0, 1, 2, 1, 0, 2, 3]
    with torch.no_grad(), model.recording():
        out = model(x, t, y)
        together = [{int(i): row for images, kept in b.kept for i, row in zip(images, kept)} for b in model.routed_blocks]
    for g in range(4):
        idx = (regions == g).nonzero().squeeze(1)
        with torch.no_grad(), model.recording():
            alone = model(x[idx], t[idx], y[idx])
        for layer, block in enumerate(model.routed_blocks):
            ((images, kept),) = block.kept
            assert images is None and kept.shape[1] == model.schedule[layer, g]
            for j, i in enumerate(idx.tolist()):
                assert torch.equal(kept[j], together[layer][i])
        # The embedders, blocks and final layer see 2 images instead of 8: rounding apart.
        torch.testing.assert_close(alone, out[idx], rtol=1e-12, atol=1e-12)
    assert model.last_macs.shape == (2,)


def test_timestep_regions_of_diffusion_and_flow():
    t = torch.tensor([0, 249, 250, 499, 500, 999])
    assert regions_of(t, 4, "diffusion").tolist() == [0, 0, 1, 1, 2, 3]
    assert regions_of(t, 1, "diffusion").tolist() == [0] * 6
    flow = torch.tensor([0.0, 0.2499, 0.25, 0.74, 0.75, 1.0])
    assert regions_of(flow, 4, "flow").tolist() == [0, 0, 1, 2, 3, 3]


# -- 3. gradients reach the ratios and the routers, with the right values ------------------

def ratio_fd(model, loss, layer: int, g: int, h: float = 1e-6) -> float:
    with torch.no_grad():
        model.ratios[layer, g] += h
        up = float(loss())
        model.ratios[layer, g] -= 2 * h
        down = float(loss())
        model.ratios[layer, g] += h
    return (up - down) / (2 * h)


@pytest.mark.parametrize("multiplier", ["score", "straight-through"])
def test_ratio_gradients_match_finite_differences_in_float64(multiplier):
    """Ratios between bins, 2 blocks x 2 regions: d loss / d ratio by autograd = central
    differences of the whole model in float64 (the top-k does not move with the ratios).

    With the straight-through multiplier the forward does not depend on the scores, but its
    gradient does flow through a later block's scores into that block's input (d s / d x):
    the first block's ratios then match the finite differences only with the later routers at
    zero; the last block's always do."""
    settings = RoutingSettings(regions=2, multiplier=multiplier)
    model = random_routers_(RoutedModel(dense_dit(2), settings)).double().train()
    set_ratios_(model, [[0.55, 0.83], [0.97, 0.35]])
    x, t, y = inputs(4, t=[100, 900, 400, 600])
    x = x.double()
    weights = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    loss = lambda: (model(x, t, y) * weights).sum()  # noqa: E731

    def autograd() -> torch.Tensor:
        model.zero_grad()
        loss().backward()
        assert (model.ratios.grad != 0).all()
        return model.ratios.grad.clone()

    grad = autograd()
    for layer, g in ((1, 0), (1, 1)) if multiplier == "straight-through" else ((0, 0), (0, 1), (1, 0), (1, 1)):
        assert ratio_fd(model, loss, layer, g) == pytest.approx(float(grad[layer, g]), rel=1e-6), (layer, g)
    if multiplier == "straight-through":
        assert ratio_fd(model, loss, 0, 0) != pytest.approx(float(grad[0, 0]), rel=1e-3)  # the surrogate path
        with torch.no_grad():
            model.routed_blocks[1].router.weight.zero_()
        grad = autograd()
        for g in (0, 1):
            assert ratio_fd(model, loss, 0, g) == pytest.approx(float(grad[0, g]), rel=1e-6), g


def test_ratios_outside_the_range_are_read_clamped_with_the_gradient_passing():
    model = RoutedModel(dense_dit(1), RoutingSettings(regions=3)).double().train()
    set_ratios_(model, [[0.05, 1.4, 0.5]])
    kept = model.kept_ratios()
    assert kept.detach().tolist() == [[0.1, 1.0, 0.5]]
    g = torch.tensor([[2.0, -3.0, 5.0]], dtype=torch.float64)
    (kept * g).sum().backward()
    assert torch.equal(model.ratios.grad, g)  # identity: a ratio pushed past a bound can come back
    # The forward runs the clamped ratios: bins (1, 2) = 2, 4 tokens at weight 0 on the upper,
    # (9, 10) = 15, 16 at weight 1, and 0.5 on bin 5 with its upper neighbour: 8, 10 at weight 0.
    x, t, y = inputs(3, t=[10, 500, 900])
    with model.recording():
        model(x.double(), t, y)
    runs = [(images.tolist(), kept.shape[1]) for images, kept in model.routed_blocks[0].kept]
    assert runs == [([0], 2), ([0], 4), ([1], 15), ([1], 16), ([2], 8), ([2], 10)]


def test_a_block_between_two_bins_is_linear_in_the_ratio():
    """Between bins b and b + 1 the block's output is (1 - w) y_b + w y_(b+1), w = r * bins - b:
    a wide finite difference (across half the bin) equals bins * (y_(b+1) - y_b) exactly."""
    block = dense_dit(1).double().blocks[0]
    routed = routed_block(block).double()
    x = torch.randn(3, T, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    c = torch.randn(3, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def run(r: float) -> torch.Tensor:
        lo, hi = bin_pair(r, 10)
        w = interpolation_weight(torch.tensor(r, dtype=torch.float64), lo, 10)
        routed.plan = RoutePlan([RouteGroup(None, [(capacity(lo, 10, T), 1 - w), (capacity(hi, 10, T), w)])])
        with torch.no_grad():
            return routed(x, c)

    def at(k: int) -> torch.Tensor:
        routed.plan = RoutePlan([RouteGroup(None, [(k, None)])])
        with torch.no_grad():
            return routed(x, c)

    y5, y6 = at(capacity(5, 10, T)), at(capacity(6, 10, T))  # 8 and 10 tokens
    assert (y6 - y5).abs().max() > 1e-3
    torch.testing.assert_close((run(0.575) - run(0.525)) / 0.05, 10 * (y6 - y5), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(run(0.5), y5, rtol=0, atol=1e-12)  # on a bin: that bin alone


def mlp_update(block, kept, c):
    """The MLP branch's output (after its gate) and the block's whole update on kept tokens."""
    mod = block.modulation(c)
    x1 = kept + block.attention_branch(kept, mod)
    mlp = block.mlp_branch(x1, mod)
    return mlp, x1 + mlp - kept


@pytest.mark.parametrize("scale", ["mlp", "update"])
@pytest.mark.parametrize("multiplier", ["straight-through", "score"])
def test_the_router_gradient_is_the_score_times_what_it_scales(scale, multiplier):
    """d loss / d w = sum over kept tokens of <d loss / d y, u> s (1 - s) x, u = the MLP branch
    (scale mlp) or the whole update y - x (scale update), s = sigmoid(w . x); for both
    multipliers (straight-through: value 1, gradient ds; score: m = s)."""
    block = dense_dit(1).double().blocks[0]
    routed = routed_block(block, scale=scale, multiplier=multiplier).double()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, T, D, generator=gen, dtype=torch.float64)
    c = torch.randn(3, D, generator=gen, dtype=torch.float64)
    g = torch.randn(3, T, D, generator=gen, dtype=torch.float64)  # d loss / d y
    k = 6
    routed.plan = RoutePlan([RouteGroup(None, [(k, None)])])
    out = routed(x, c)
    (out * g).sum().backward()

    index = top_k_spatial(x, routed.router.weight, k)
    rows = torch.arange(3).unsqueeze(1)
    kept = x[rows, index]  # (3, k, D)
    with torch.no_grad():
        mlp, update = mlp_update(block, kept, c)
        u = mlp if scale == "mlp" else update
        s = torch.sigmoid(kept @ routed.router.weight.T).squeeze(-1)  # (3, k)
        expected = (((g[rows, index] * u).sum(-1) * s * (1 - s)).unsqueeze(-1) * kept).sum((0, 1))
        # The value: straight-through leaves the block as it is; score scales u by s.
        value = kept + update - (0 if multiplier == "straight-through" else (1 - s).unsqueeze(-1) * u)
    torch.testing.assert_close(routed.router.weight.grad.squeeze(0), expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.detach()[rows, index], value, rtol=1e-9, atol=1e-12)
    assert expected.abs().max() > 1e-3
    if multiplier == "score":  # a true function of w: central differences agree
        w0 = routed.router.weight.detach().clone()
        for j in (0, 7, 31):
            values = []
            for step in (1e-6, -1e-6):
                with torch.no_grad():
                    routed.router.weight.copy_(w0)
                    routed.router.weight[0, j] += step
                    values.append(float((routed(x, c) * g).sum()))
            fd = (values[0] - values[1]) / 2e-6
            assert fd == pytest.approx(float(expected[j]), rel=1e-6, abs=1e-9)
