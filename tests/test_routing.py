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
    routed = routed_block(block)
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
    routed = routed_block(block)
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


@pytest.mark.parametrize("family", FAMILIES)
def test_a_routed_model_of_each_family_runs_its_schedule(family):
    """The whole backbone with its block list swapped for the routed blocks: at ratio 1 the
    plain model; with a schedule, each block keeps its scheduled k of the tokens it gets.
    (At e5309f2 every forward of a routed diffusers DiT raised AttributeError: its forward
    reads `transformer_blocks[0].norm1.emb`; fixed in 1cc2255.)"""
    model = family_model(family)
    x, t, cond = family_inputs(family)
    routed = random_routers_(RoutedModel(model, RoutingSettings(regions=1))).eval()
    with torch.no_grad():
        dense = backbone(model).predict(x, t, cond)
        assert torch.equal(backbone(routed).predict(x, t, cond), dense)
        routed.set_schedule([[6], [11]])
        with routed.recording():
            out = backbone(routed).predict(x, t, cond)
    assert [kept.shape for block in routed.routed_blocks for _, kept in block.kept] == [(4, 6), (4, 11)]
    assert (out - dense).abs().max() > 1e-4
    assert block_list(model)[0] is routed.routed_blocks[0].block  # the backbone's own list is back


def set_ratios_(model: RoutedModel, values) -> RoutedModel:
    with torch.no_grad():
        model.ratios.copy_(torch.as_tensor(values, dtype=model.ratios.dtype).expand_as(model.ratios))
    return model


def runs_per_image(block: RoutedBlock, n: int) -> dict[int, list[int]]:
    """The capacities each image of the last forward ran at (from the recorded token indices;
    a block may run the images of several regions that share a capacity in one call)."""
    runs: dict[int, list[int]] = {i: [] for i in range(n)}
    for images, kept in block.kept:
        for i in (range(n) if images is None else images.tolist()):
            runs[i].append(kept.shape[1])
    return {i: sorted(ks) for i, ks in runs.items()}


def kept_rows(block: RoutedBlock, n: int) -> dict[int, list[torch.Tensor]]:
    rows: dict[int, list[torch.Tensor]] = {i: [] for i in range(n)}
    for images, kept in block.kept:
        for j, i in enumerate(range(n) if images is None else images.tolist()):
            rows[i].append(kept[j])
    return rows


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
        for i, rows in kept_rows(block, 8).items():
            (row,) = rows  # every image ran once, at its region's capacity
            k = int(schedule[layer, int(regions[i])])
            assert torch.equal(row, top_k_spatial(x_in[i : i + 1], block.router.weight, k)[0])


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
    assert runs_per_image(model.routed_blocks[0], 3) == {0: [2, 4], 1: [15, 16], 2: [8, 10]}


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


# -- 4. bins, capacities and interpolation at their edges -----------------------------------

@pytest.mark.parametrize("bins", [10, 4, 3])
@pytest.mark.parametrize("n", [16, 256, 7, 10])
def test_capacities_are_the_ceiling_of_ratio_times_tokens_in_exact_arithmetic(bins, n):
    for i in range(1, bins + 1):
        assert capacity(i, bins, n) == math.ceil(Fraction(i, bins) * n), (i, bins, n)
    assert capacity(bins, bins, n) == n and capacity(1, bins, n) >= 1
    with pytest.raises(ValueError):
        capacity(0, bins, n)
    with pytest.raises(ValueError):
        capacity(bins + 1, bins, n)


def test_capacities_do_not_fall_into_the_float_trap():
    assert math.ceil(3 * 0.1 * 10) == 4  # 0.30000000000000004 * 10: the naive way is one too many
    assert capacity(3, 10, 10) == 3 and capacity(3, 10, 20) == 6 and capacity(7, 10, 10) == 7
    assert [capacity(i, 10, 16) for i in range(1, 11)] == [2, 4, 5, 7, 8, 10, 12, 13, 15, 16]
    assert [capacity(i, 10, 7) for i in range(1, 11)] == [1, 2, 3, 3, 4, 5, 5, 6, 7, 7]


def test_bin_pairs_and_weights_at_the_edges_on_the_bins_and_between():
    assert bin_pair(1.0, 10) == (9, 10) and bin_pair(0.1, 10) == (1, 2)
    assert bin_pair(1.7, 10) == (9, 10) and bin_pair(0.0, 10) == (1, 2)  # outside: the end pairs
    for i in range(1, 10):
        # On an inner bin (both ways of writing it): that bin is the lower end, weight 0.
        for r in (i / 10, i * 0.1, float(Fraction(i, 10))):
            assert bin_pair(r, 10) == (i, i + 1), r
            assert float(interpolation_weight(torch.tensor(r, dtype=torch.float64), i, 10)) == pytest.approx(0, abs=1e-12)
        # As float32 parameters hold them: the mix lands on the bin (weight ~0 above or ~1 below).
        r32 = float(torch.tensor(i / 10, dtype=torch.float32))
        lo, hi = bin_pair(r32, 10)
        assert hi == lo + 1 and lo in (i - 1, i)
        assert lo + float(interpolation_weight(torch.tensor(r32), lo, 10)) == pytest.approx(i, abs=1e-6)
    assert bin_pair(0.55, 10) == (5, 6)
    assert float(interpolation_weight(torch.tensor(0.55, dtype=torch.float64), 5, 10)) == pytest.approx(0.5)
    assert float(interpolation_weight(torch.tensor(1.0), 9, 10)) == 1.0
    assert bin_pair(0.6, 4) == (2, 3) and bin_pair(0.25, 4) == (1, 2) and bin_pair(0.75, 4) == (3, 4)


def test_nearest_bins_round_halves_up_and_stay_in_range():
    assert [nearest_bin(r, 10) for r in (0.3, 0.1 * 3, 0.54, 0.55, 0.56, 0.04, 0.0, 1.0, 1.5)] == [3, 3, 5, 6, 6, 1, 1, 10, 10]
    assert nearest_bin(0.125, 4) == 1 and nearest_bin(0.375, 4) == 2  # halves up: 0.5 of a bin


def test_clamp_ratios_keeps_values_in_range_and_passes_the_gradient():
    r = torch.tensor([-1.0, 0.0, 0.05, 0.1, 0.5, 1.0, 1.2, 9.0], requires_grad=True)
    out = clamp_ratios(r, 10)
    assert out.detach().tolist() == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.5, 1.0, 1.0, 1.0])
    g = torch.arange(8.0)
    (out * g).sum().backward()
    assert torch.equal(r.grad, g)


def test_a_ratio_between_bins_mixes_the_two_capacities_outputs(routed3):
    """In training, a block between bins runs both capacities and mixes the outputs with
    (1 - w, w); the recorded runs and the output of block 1 say so."""
    model = fresh(routed3).train()
    with torch.no_grad():
        model.ratios.fill_(1.0)
        model.ratios[1] = 0.58  # bins 5 and 6 (8 and 10 tokens), w = 0.8
    x, t, y = inputs(4, t=[40] * 4)
    captured = {}
    h = model.routed_blocks[1].register_forward_hook(lambda m, a, out: captured.update(x=a[0].detach(), args=a[1:], out=out.detach()))
    with model.recording():
        model(x, t, y)
    h.remove()
    block = model.routed_blocks[1]
    assert [kept.shape[1] for _, kept in block.kept] == [8, 10]
    w = float(torch.tensor(0.58) * 10 - 5)
    assert w == pytest.approx(0.8, abs=1e-6)

    def at(k):
        block.plan = RoutePlan([RouteGroup(None, [(k, None)])])
        try:
            with torch.no_grad():
                return block(captured["x"], *captured["args"])
        finally:
            block.plan = None

    torch.testing.assert_close(captured["out"], (1 - w) * at(8) + w * at(10), rtol=1e-6, atol=1e-6)


def test_regions_that_share_a_capacity_mix_each_image_with_its_own_weight(routed3):
    """Training, 2 regions: region 0 at 0.58 (8 and 10 tokens, w = 0.8), region 1 at 0.63
    (10 and 12 tokens, w = 0.3). The images of both regions run 10 tokens together; each
    image's output is its own (1 - w) y_lo + w y_hi, with y of that image alone."""
    model = fresh(routed3).train()
    with torch.no_grad():
        model.ratios.fill_(1.0)
        model.ratios[1, 0], model.ratios[1, 1] = 0.58, 0.63
    x, t, y = inputs(4, t=[40, 300, 60, 280])  # regions 0 1 0 1
    captured = {}
    block = model.routed_blocks[1]
    h = block.register_forward_hook(lambda m, a, out: captured.update(x=a[0].detach(), args=a[1:], out=out.detach()))
    with model.recording():
        model(x, t, y)
    h.remove()
    assert sorted(kept.shape[1] for _, kept in block.kept) == [8, 10, 12]  # one call per distinct capacity
    assert runs_per_image(block, 4) == {0: [8, 10], 1: [10, 12], 2: [8, 10], 3: [10, 12]}
    weights = {0: float(torch.tensor(0.58) * 10 - 5), 1: float(torch.tensor(0.63) * 10 - 6)}

    def alone(i, k):
        block.plan = RoutePlan([RouteGroup(None, [(k, None)])])
        try:
            with torch.no_grad():
                return block(captured["x"][i : i + 1], *(a[i : i + 1] for a in captured["args"]))
        finally:
            block.plan = None

    for i, (g, (lo, hi)) in enumerate(zip([0, 1, 0, 1], [(8, 10), (10, 12), (8, 10), (10, 12)])):
        w = weights[g]
        torch.testing.assert_close(captured["out"][i : i + 1], (1 - w) * alone(i, lo) + w * alone(i, hi), rtol=1e-5, atol=1e-5)


def test_the_job_projects_the_ratios_into_range_after_a_step(routed3):
    model = fresh(routed3)
    ema = fresh(routed3)
    job = RouteJob(model, RoutingTraining(target=0.5), PLAIN)
    values = [[1.3, 0.02, 0.5, 1.0], [-0.4, 0.1, 0.99, 2.0], [0.3, 0.05, 0.6, 0.7]]
    set_ratios_(model, values)
    set_ratios_(ema, values)
    job.on_step_end(0, model, ema)
    expected = torch.tensor(values).clamp(0.1, 1.0)
    assert torch.equal(model.ratios.detach(), expected) and torch.equal(ema.ratios.detach(), expected)


# -- 5. the budget losses and the MAC count ---------------------------------------------------

def block_macs(k: int, d: int = D, mlp: int = 4 * D, tokens: int = T) -> int:
    """An independent count of a DiT block at k of its tokens, per image: qkv 3 D^2 k,
    attention scores and values 2 k^2 D, output projection D^2 k, MLP 2 D Dm k, adaLN 6 D^2,
    and the router's D MACs on every one of the block's input tokens (it scores all of them)."""
    return 3 * d * d * k + 2 * k * k * d + d * d * k + 2 * d * mlp * k + 6 * d * d + d * tokens


def dense_dit_macs(depth: int, d: int = D, tokens: int = T, patch: int = 2, channels: int = 1, out: int = 2) -> int:
    """The plain DiT per image: patch embedding, the timestep MLP (256 frequencies), blocks at
    every token without routers, the final layer's adaLN and projection."""
    blocks = depth * (block_macs(tokens, d, 4 * d, tokens) - d * tokens)
    return tokens * patch * patch * channels * d + 256 * d + d * d + blocks + 2 * d * d + tokens * d * patch * patch * out


def test_the_mac_coefficients_are_an_independent_count_of_a_dit_block(routed3):
    macs = routed3.macs
    assert macs.dense_total == dense_dit_macs(3)
    assert macs.coefficients.tolist() == [[6 * D * D + D * T, 4 * D * D + 2 * D * 4 * D, 2 * D]] * 3
    for k in (1, 2, 7, 13, 16):
        assert macs.blocks(torch.full((3,), k)).tolist() == [block_macs(k)] * 3
    assert float(macs.total(torch.full((3,), T))) == dense_dit_macs(3) + 3 * D * T  # dense + the routers


def test_the_mac_count_of_a_forward_is_torchs_flop_counter(routed3):
    """At several schedules (regions with different capacities), the MACs the model reports
    for a forward are what torch's FLOP counter counts for it."""
    from torch.utils.flop_counter import FlopCounterMode

    from leandit.models.flops import _register_cpu_attention

    _register_cpu_attention()
    model = fresh(routed3).eval()
    x, t, y = inputs(8)
    for schedule in ([[1, 2, 3, 4], [16, 9, 5, 7], [8, 8, 16, 1]], [[16] * 4] * 3, [[5] * 4] * 3):
        model.set_schedule(schedule)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x, t, y)
        k = torch.tensor(schedule)
        regions = regions_of(t, 4, "diffusion")
        by_hand = [model.macs.fixed + sum(block_macs(int(k[layer, g])) for layer in range(3)) for g in regions.tolist()]
        assert model.last_macs.tolist() == pytest.approx(by_hand, rel=1e-12)
        assert counter.get_total_flops() / 2 == pytest.approx(sum(by_hand), rel=1e-12)
    assert model.macs.fixed == dense_dit_macs(3) - 3 * (block_macs(T) - D * T)


def test_the_ratio_budget_is_the_squared_gap_of_the_mean_kept_ratio(routed3):
    model = set_ratios_(fresh(routed3), [[0.3, 0.5, 0.8, 1.0], [0.1, 0.6, 0.4, 0.2], [0.9, 0.7, 1.3, 0.05]])
    job = RouteJob(model, RoutingTraining(target=0.7), PLAIN)
    loss, logs = job.budget()
    kept = [0.3, 0.5, 0.8, 1.0, 0.1, 0.6, 0.4, 0.2, 0.9, 0.7, 1.0, 0.1]  # read clamped
    mean = sum(kept) / 12
    assert float(loss.detach()) == pytest.approx((mean - 0.3) ** 2, rel=1e-6)
    assert float(logs["kept_ratio"]) == pytest.approx(mean, rel=1e-6)
    assert float(ratio_budget_loss(torch.tensor([0.5, 0.7]), 0.3)) == pytest.approx((0.6 - 0.7) ** 2)
    loss.backward()
    # d / d r_i = 2 (mean - 0.3) / 12, for clamped ratios too
    assert model.ratios.grad.flatten().tolist() == pytest.approx([2 * (mean - 0.3) / 12] * 12, rel=1e-6)


def test_the_mac_budget_interpolates_the_block_counts_between_bins(routed3):
    """The MAC ratio training sees: per block and region (1 - w) M(k_lo) + w M(k_hi) by the
    independent block count, plus the fixed part, over the dense count, mean over regions;
    its gradient w.r.t. a ratio is bins (M(k_hi) - M(k_lo)) / dense / regions."""
    values = [[0.35, 0.5, 0.82, 1.0], [0.1, 0.64, 0.47, 0.21], [0.95, 0.7, 0.3, 0.58]]
    model = set_ratios_(fresh(routed3), values).double()
    dense = dense_dit_macs(3)
    fixed = dense - 3 * (block_macs(T) - D * T)
    per_region, slopes = [], []
    for g in range(4):
        total = fixed
        for layer in range(3):
            r = float(torch.tensor(values[layer][g], dtype=torch.float32))  # as the parameter holds it
            lo = min(math.floor(r * 10 + 1e-9), 9)
            w = r * 10 - lo
            m_lo, m_hi = block_macs(math.ceil(Fraction(lo, 10) * T)), block_macs(math.ceil(Fraction(lo + 1, 10) * T))
            total += (1 - w) * m_lo + w * m_hi
            slopes.append(10 * (m_hi - m_lo) / dense / 4)
        per_region.append(total / dense)
    expected = sum(per_region) / 4
    ratio = model.interpolated_mac_ratio()
    assert float(ratio.detach()) == pytest.approx(expected, rel=1e-9)
    ratio.backward()
    assert model.ratios.grad.T.flatten().tolist() == pytest.approx(slopes, rel=1e-9)
    job = RouteJob(model, RoutingTraining(target=0.3, budget="macs"), PLAIN)
    loss, logs = job.budget()
    assert float(loss.detach()) == pytest.approx((expected - 0.7) ** 2, rel=1e-9)
    assert float(logs["macs_ratio"]) == pytest.approx(expected, rel=1e-9)
    assert float(mac_budget_loss(torch.tensor(0.5), 0.3)) == pytest.approx(0.04)
    # The frozen schedule's MAC ratio per region: each ratio at its nearest bin, by hand.
    nearest = [[math.ceil(Fraction(nearest_bin(float(torch.tensor(v, dtype=torch.float32)), 10), 10) * T) for v in row] for row in values]
    assert model.hard_schedule().tolist() == nearest
    frozen = [(fixed + sum(block_macs(nearest[layer][g]) for layer in range(3))) / dense for g in range(4)]
    assert model.mac_ratio_per_region().tolist() == pytest.approx(frozen, rel=1e-12)


def test_the_reachable_floor_is_every_block_at_the_lowest_bin(routed3):
    assert RouteJob.reachable(routed3, "ratio") == pytest.approx(0.1)
    dense = dense_dit_macs(3)
    floor = (dense - 3 * (block_macs(T) - D * T) + 3 * block_macs(2)) / dense  # 2 = ceil(0.1 * 16) tokens
    assert RouteJob.reachable(routed3, "macs") == pytest.approx(floor, rel=1e-12)
    with pytest.raises(ValueError) as err:
        RouteJob(fresh(routed3), RoutingTraining(target=1 - floor + 0.01, budget="macs"), PLAIN)
    assert f"at most {math.floor((1 - floor) * 100) / 100:g}" in one_line(err)
    RouteJob(fresh(routed3), RoutingTraining(target=1 - floor - 0.01, budget="macs"), PLAIN)
    RouteJob(fresh(routed3), RoutingTraining(target=0.9), PLAIN)  # the ratio budget reaches 0.1


# -- 6. a training step, the frozen schedule, the model folder --------------------------------

def test_a_route_job_step_reaches_every_router_and_ratio_and_stratifies_regions(routed3):
    from leandit.diffusion import StepRandom

    model = set_ratios_(fresh(routed3), 0.65).train()
    job = RouteJob(model, RoutingTraining(target=0.5), PLAIN)
    x, _, y = inputs(8)
    random = lambda: StepRandom(seed=0, step=0, global_batch=8, rank=0, world_size=1, device=torch.device("cpu"))  # noqa: E731
    _, t, _, _ = job.draw_inputs((x, y), random())
    assert regions_of(t, 4, "diffusion").tolist() == [0, 1, 2, 3, 0, 1, 2, 3]  # image i in region i mod 4
    loss, logs = job.compute_loss(model, (x, y), random())
    assert float(logs["budget_loss"]) == pytest.approx((0.65 - 0.5) ** 2, rel=1e-5)
    loss.backward()
    assert torch.isfinite(model.ratios.grad).all() and (model.ratios.grad != 0).all()  # every block, every region
    for i, block in enumerate(model.routed_blocks):
        grad = block.router.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, i
    assert model.inner.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    groups = job.parameter_groups()
    assert [g["name"] for g in groups] == ["weights", "routers"]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.router_parameters()}
    assert groups[1]["weight_decay"] == 0.0


def test_unfrozen_eval_equals_the_frozen_model_and_frozen_training_runs_one_capacity(routed3):
    model = set_ratios_(fresh(routed3), [[0.34, 0.55, 0.81, 1.0], [0.12, 0.66, 0.47, 0.26], [0.96, 0.74, 0.3, 0.5]])
    x, t, y = inputs(8)
    with torch.no_grad():
        unfrozen = model.eval()(x, t, y)
        unfrozen_macs = model.last_macs.clone()
    schedule = model.freeze().clone()
    expected = [[math.ceil(Fraction(nearest_bin(float(torch.tensor(v)), 10), 10) * T) for v in row]
                for row in [[0.34, 0.55, 0.81, 1.0], [0.12, 0.66, 0.47, 0.26], [0.96, 0.74, 0.3, 0.5]]]
    assert schedule.tolist() == expected == [[5, 10, 13, 16], [2, 12, 8, 5], [16, 12, 5, 8]]
    with torch.no_grad():
        assert torch.equal(model.eval()(x, t, y), unfrozen)
    assert torch.equal(model.last_macs, unfrozen_macs)
    # Frozen, in training mode (gradients on): one run per block and group, at its scheduled k.
    model.train()
    with model.recording():
        out = model(x, t, y)
    regions = regions_of(t, 4, "diffusion").tolist()
    for layer, block in enumerate(model.routed_blocks):
        assert runs_per_image(block, 8) == {i: [int(schedule[layer, g])] for i, g in enumerate(regions)}
    torch.testing.assert_close(out.detach(), unfrozen, rtol=0, atol=0)  # straight-through: value exactly 1
    out.sum().backward()
    assert model.routed_blocks[0].router.weight.grad.abs().sum() > 0  # the routers still learn
    # Back to the learned ratios: training runs each image at the two bins around its ratio.
    model.set_schedule(None)
    with model.recording():
        model(x, t, y)
    ratios = model.kept_ratios().detach()
    for layer, block in enumerate(model.routed_blocks):
        pairs = {g: sorted(capacity(b, 10, T) for b in bin_pair(float(ratios[layer, g]), 10)) for g in range(4)}
        assert runs_per_image(block, 8) == {i: pairs[g] for i, g in enumerate(regions)}


def test_the_schedule_routers_and_ratios_round_trip_through_the_model_folder(routed3, tmp_path):
    from safetensors.torch import load_file

    model = set_ratios_(fresh(routed3), [[0.34, 0.55, 0.81, 1.0], [0.12, 0.66, 0.47, 0.26], [0.96, 0.74, 0.3, 0.5]])
    folder = leandit.save_model(model, tmp_path / "model")
    assert (folder / "wrapper-0-diffcr.safetensors").exists()
    meta = json.loads((folder / "config.json").read_text())["wrappers"][0]
    assert meta["type"] == "diffcr"
    table = meta["table"]
    assert table["schedule"] == model.hard_schedule().tolist() and table["tokens"] == T
    assert table["settings"] == {"regions": 4, "bins": 10, "scale": "mlp", "multiplier": "straight-through", "skipped_kv": False}
    assert table["macs_ratio_per_region"] == pytest.approx(model.mac_ratio_per_region().tolist(), abs=1e-4)
    tensors = load_file(str(folder / "wrapper-0-diffcr.safetensors"))
    assert sorted(tensors) == ["blocks.0.router.weight", "blocks.1.router.weight", "blocks.2.router.weight", "ratios"]

    loaded = leandit.load_model(folder)
    assert isinstance(loaded, RoutedModel) and loaded.settings == model.settings
    assert loaded.schedule is not None and torch.equal(loaded.schedule, model.hard_schedule())
    assert torch.equal(loaded.ratios.detach(), model.ratios.detach())
    for a, b in zip(loaded.routed_blocks, model.routed_blocks):
        assert torch.equal(a.router.weight, b.router.weight)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    x, t, y = inputs(8)
    with torch.no_grad():
        # The same kernels on the same shapes; a loaded tensor may sit at another memory
        # alignment, so float rounding is allowed, no more.
        torch.testing.assert_close(loaded.eval()(x, t, y), model.eval()(x, t, y), rtol=1e-6, atol=1e-6)
    assert torch.equal(loaded.last_macs, model.last_macs)
    assert loaded.summary()["frozen"] and loaded.summary()["schedule"] == model.hard_schedule().tolist()
    # The backbone's own file stays a plain model's.
    assert set(load_file(str(folder / "model.safetensors"))) == set(model.inner.state_dict())


def test_a_flow_model_routes_by_its_own_regions(tmp_path):
    """SiT: t in [0, 1], region 0 the noisiest; a round trip keeps its schedule."""
    sit = randomize_(tiny_model(hidden_size=D, num_heads=HEADS, depth=2, objective="flow", learn_sigma=False), std=0.2)
    model = random_routers_(RoutedModel(sit, RoutingSettings(regions=2)))
    model.set_schedule([[4, 12], [9, 2]])
    x, _, y = inputs(4)
    t = torch.tensor([0.1, 0.9, 0.4, 0.6])
    with torch.no_grad(), model.recording():
        model.eval()(x, t, y)
    assert runs_per_image(model.routed_blocks[1], 4) == {0: [9], 1: [2], 2: [9], 3: [2]}
    loaded = leandit.load_model(leandit.save_model(model, tmp_path / "sit"))
    assert loaded.schedule.tolist() == [[4, 12], [9, 2]] and loaded.objective == "flow"


def test_skipped_tokens_as_keys_and_values_give_the_dense_blocks_kept_rows():
    """--skipped-kv: a kept token's query attends to every token's key and value; each token's
    residual and MLP are its own, so the kept rows are the dense block's rows at those
    positions (run on all 16 tokens here); the MACs lose the k^2 term."""
    model = dense_dit(1)
    routed_model = RoutedModel(model, RoutingSettings(regions=1, skipped_kv=True))
    c0, c1, c2 = routed_model.macs.coefficients[0].tolist()
    assert (c0, c1, c2) == (6 * D * D + D * T + 2 * D * D * T, 2 * D * D + 2 * D * 4 * D + 2 * T * D, 0.0)
    routed = routed_model.routed_blocks[0]
    with torch.no_grad():
        routed.router.weight.copy_(torch.randn(1, D, generator=torch.Generator().manual_seed(8)))
    block = routed.block
    gen = torch.Generator().manual_seed(9)
    x, c = torch.randn(3, T, D, generator=gen), torch.randn(3, D, generator=gen)
    routed.plan = RoutePlan([RouteGroup(None, [(5, None)])])
    with torch.no_grad():
        out = routed(x, c)
        dense = block(x, c)
    index = top_k_spatial(x, routed.router.weight, 5)
    rows = torch.arange(3).unsqueeze(1)
    torch.testing.assert_close(out[rows, index], dense[rows, index], rtol=1e-5, atol=1e-6)
    skipped = torch.ones(3, T, dtype=torch.bool)
    skipped[rows, index] = False
    assert torch.equal(out[skipped], x[skipped])
    # Attention among the kept tokens alone (the default) is another function.
    assert (by_hand(block, x, (c,), {}, torch.arange(3), index)[rows, index] - dense[rows, index]).abs().max() > 1e-3


def test_pixarts_image_attention_mask_is_applied_to_the_kept_tokens():
    """PixArt can take a self-attention mask over the image tokens (N, 16). A routed block
    must read it for the tokens it keeps: the kept rows are the block on those tokens with the
    mask of those tokens. (At e5309f2 the (N, 1, 16) bias went on unchanged and diffusers'
    attention raised a size mismatch; fixed in 20a7f95.)"""
    model = family_model("pixart")
    x, t, cond = family_inputs("pixart")
    image_mask = torch.ones(4, T, dtype=torch.long)
    image_mask[:, 11:] = 0
    calls = {}
    block = block_list(model)[1]
    handle = block.register_forward_pre_hook(lambda m, a, kw: calls.setdefault("call", (a, dict(kw))) and None, with_kwargs=True)
    with torch.no_grad():
        backbone(model).predict(x, t, cond, attention_mask=image_mask)
    handle.remove()
    args, kwargs = calls["call"]
    tokens = args[0] if args else kwargs.pop("hidden_states")
    args = args[1:]
    bias = kwargs["attention_mask"]  # (N, 1, T) additive
    assert bias is not None and bias.shape[-1] == T
    routed = routed_block(block, scale="update")
    routed.plan = RoutePlan([RouteGroup(None, [(8, None)])])
    with torch.no_grad():
        out = routed(tokens, *args, **kwargs)
    index = top_k_spatial(tokens, routed.router.weight, 8)
    rows = torch.arange(4).unsqueeze(1)
    kept_bias = bias.gather(-1, index.unsqueeze(1))  # (N, 1, k): the mask of the kept keys
    with torch.no_grad():
        y = block(tokens[rows, index], *args, **{**kwargs, "attention_mask": kept_bias})
    torch.testing.assert_close(out[rows, index], y, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # and the mask matters: without it the kept rows differ
        unmasked = block(tokens[rows, index], *args, **{**kwargs, "attention_mask": None})
    assert (unmasked - y).abs().max() > 1e-4


# -- 7. bad inputs: one-line errors ---------------------------------------------------------

@pytest.mark.parametrize("target", [0.0, 1.0, 1.5, -0.1, float("nan"), float("inf")])
def test_a_target_outside_zero_to_one_is_refused(target):
    with pytest.raises(ValueError) as err:
        RoutingTraining(target=target)
    assert "(0, 1)" in one_line(err)


def test_bad_training_and_routing_settings_are_refused_in_one_line():
    for bad in (dict(budget="flops"), dict(budget_weight=0.0), dict(budget_weight=float("nan")), dict(router_lr=-1.0),
                dict(router_lr=float("inf"))):
        with pytest.raises(ValueError) as err:
            RoutingTraining(target=0.5, **bad)
        one_line(err)
    for bad, word in ((dict(scale="attention"), "--scale"), (dict(multiplier="gumbel"), "--multiplier"),
                      (dict(regions=0), "--regions"), (dict(bins=1), "--bins")):
        with pytest.raises(ValueError) as err:
            RoutingSettings(**bad)
        assert word in one_line(err)
    block = dense_dit(1).blocks[0]
    for bad in (dict(scale="attention"), dict(multiplier="gumbel")):
        with pytest.raises(ValueError) as err:
            RoutedBlock(block, **bad)
        one_line(err)


def test_schedules_that_do_not_fit_the_model_are_refused(routed3):
    model = fresh(routed3)
    model.set_schedule([[4] * 4] * 3)
    for bad, word in (([[4] * 4] * 4, "shape (4, 4)"), ([[4] * 4] * 2, "shape (2, 4)"), ([[4] * 5] * 3, "shape (3, 5)"),
                      ([4, 4, 4], "shape (3,)"), ([[4] * 4, [4] * 4, [0, 4, 4, 4]], "between 1 and the 16"),
                      ([[4] * 4, [4] * 4, [4, 17, 4, 4]], "between 1 and the 16"),
                      ([[4] * 4, [4] * 4, [4, -3, 4, 4]], "between 1 and the 16")):
        with pytest.raises(ValueError) as err:
            model.set_schedule(bad)
        assert word in one_line(err), bad
        assert model.schedule.tolist() == [[4] * 4] * 3  # the old schedule stays
    with pytest.raises(ValueError) as err:
        RouteJob(model, RoutingTraining(target=0.5), PLAIN)  # frozen: nothing to train
    assert "frozen" in one_line(err)
    with pytest.raises(TypeError):
        RouteJob(model.inner, RoutingTraining(target=0.5), PLAIN)


def test_skipped_kv_on_a_diffusers_model_and_a_dydit_model_with_token_routers_are_refused():
    from leandit.compress.dynamic import DynamicModel

    with pytest.raises(ValueError) as err:
        RoutedModel(family_model("dit"), RoutingSettings(skipped_kv=True))
    assert "leandit DiT/SiT blocks only" in one_line(err)
    with pytest.raises(ValueError) as err:
        RoutedModel(DynamicModel(dense_dit(2)))
    assert "--no-tokens" in one_line(err)


def test_a_dydit_model_without_token_routers_routes_as_loaded():
    """A DyDiT model made with --no-tokens, with widths that differ over t, in evaluation mode
    as load_model hands it out: routed at ratio 1 it is the DyDiT model; with a schedule of
    2 regions each block runs its k, and each region's images give what they give alone
    (each with its own DyDiT width plan). Building it counts MACs on the plain backbone's block
    calls: a DyDiT model's own decisions cannot run on meta tensors."""
    from test_dynamic import TDW, mixed_model

    dydit = mixed_model(TDW, depth=2).eval()
    routed = RoutedModel(dydit, RoutingSettings(regions=2)).eval()
    random_routers_(routed)
    x, t, y = inputs(4, t=[100, 900, 300, 700])
    heads, _ = dydit.width_decisions(t)
    assert len({tuple(h.flatten().tolist()) for h in heads}) > 1  # the images run different widths
    with torch.no_grad():
        torch.testing.assert_close(routed(x, t, y), dydit(x, t, y), rtol=1e-5, atol=1e-5)
        routed.set_schedule([[6, 10], [3, 12]])
        with routed.recording():
            out = routed(x, t, y)
        assert runs_per_image(routed.routed_blocks[0], 4) == {0: [6], 1: [10], 2: [6], 3: [10]}
        assert runs_per_image(routed.routed_blocks[1], 4) == {0: [3], 1: [12], 2: [3], 3: [12]}
        for idx in (torch.tensor([0, 2]), torch.tensor([1, 3])):
            torch.testing.assert_close(routed(x[idx], t[idx], y[idx]), out[idx], rtol=1e-5, atol=1e-5)
        assert (out - dydit(x, t, y)).abs().max() > 1e-3


@pytest.fixture(scope="module")
def routed1() -> RoutedModel:
    return random_routers_(RoutedModel(dense_dit(1)))


@pytest.fixture
def saved_routed(routed1, tmp_path):
    """A one-block routed model's folder (every load measures the blocks' MACs again)."""
    model = set_ratios_(fresh(routed1), 0.5)
    folder = leandit.save_model(model, tmp_path / "model")
    return folder, folder / "wrapper-0-diffcr.safetensors"


def refused(folder, *words) -> None:
    with pytest.raises(leandit.models.infer.CheckpointError) as err:
        leandit.load_model(folder)
    text = one_line(err)
    assert all(w in text for w in words), text


def test_damaged_or_mismatched_router_files_are_one_line_checkpoint_errors(saved_routed, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, routers = saved_routed
    good = load_file(str(routers))
    key = "blocks.0.router.weight"
    save_file({**good, key: torch.full_like(good[key], float("nan"))}, str(routers))
    refused(folder, "NaN")
    save_file({**good, "ratios": torch.full_like(good["ratios"], float("inf"))}, str(routers))
    refused(folder, "NaN or inf")
    save_file({**good, key: torch.zeros(1, D + 1)}, str(routers))
    refused(folder, "mis-shaped", key)
    save_file({**good, "ratios": torch.ones(1, 2)}, str(routers))
    refused(folder, "mis-shaped", "ratios")
    save_file({k: v for k, v in good.items() if k != key}, str(routers))
    refused(folder, "missing", key)
    save_file({**good, "blocks.1.router.weight": torch.zeros(1, D)}, str(routers))  # a deeper model's
    refused(folder, "unexpected", "blocks.1.router.weight")
    routers.write_bytes(routers.read_bytes()[:50])
    refused(folder, "wrapper-0-diffcr.safetensors")


def test_a_folder_whose_schedule_or_table_does_not_fit_is_refused(saved_routed):
    folder, _ = saved_routed
    path = folder / "config.json"
    config = json.loads(path.read_text())
    table = config["wrappers"][0]["table"]
    assert table["schedule"] == [[8] * 4]
    for schedule, words in (([], ("schedule does not fit",)),
                            (table["schedule"] + [[8] * 4], ("schedule does not fit", "shape (2, 4)")),
                            ([row[:3] for row in table["schedule"]], ("schedule does not fit", "shape (1, 3)")),
                            ([[17, 8, 8, 8]], ("schedule does not fit", "between 1 and the 16"))):
        path.write_text(json.dumps({**config, "wrappers": [{**config["wrappers"][0], "table": {**table, "schedule": schedule}}]}))
        refused(folder, *words)
    bad_settings = {**table, "settings": {**table["settings"], "scale": "attention"}}
    path.write_text(json.dumps({**config, "wrappers": [{**config["wrappers"][0], "table": bad_settings}]}))
    refused(folder, "routing table")
    no_schedule = {k: v for k, v in table.items() if k != "schedule"}
    path.write_text(json.dumps({**config, "wrappers": [{**config["wrappers"][0], "table": no_schedule}]}))
    refused(folder, "routing table")


def test_each_weight_set_of_a_folder_comes_back_with_its_own_schedule(routed3, tmp_path):
    """A folder saved with EMA weights holds two sets of ratios. load_model gives the EMA's by
    default, with the schedule frozen from the EMA's ratios; weights="model" gives the
    trained ratios, which must run the schedule frozen from those ratios (the schedule is what
    inference runs, not a description), not the EMA's.

    FAILS after 20a7f95: the folder stores one table, the EMA copy's (models/wrappers.py
    `write_wrappers`, table_layers), and build_saved (routing/saving.py) sets that schedule
    whatever weights are loaded: `leandit sample RUN/model --weights model` samples the
    trained weights at the EMA's capacities (after a short `leandit route` run, nearly dense)."""
    model = set_ratios_(fresh(routed3), [[0.34, 0.55, 0.81, 1.0], [0.12, 0.66, 0.47, 0.26], [0.96, 0.74, 0.3, 0.5]])
    ema = set_ratios_(fresh(routed3), 1.0)
    folder = leandit.save_model(model, tmp_path / "model", ema=ema)
    default = leandit.load_model(folder)
    assert torch.equal(default.ratios.detach(), ema.ratios.detach())
    assert torch.equal(default.schedule, ema.hard_schedule())
    raw = leandit.load_model(folder, weights="model")
    assert torch.equal(raw.ratios.detach(), model.ratios.detach())
    assert torch.equal(raw.schedule, model.hard_schedule()), "weights='model' runs the EMA's schedule"
