"""DyDiT (leandit.compress.dynamic): the dynamic model starts exactly at the dense one, the
straight-through gradients reach every router with the values an explicit computation gives,
the MAC count agrees with torch's FLOP counter, the sliced inference computes what the masked
training computes, the routers and the width table survive the model folder, and bad inputs
are refused in one line.

Every model is a tiny random DiT (hidden 32, 4 heads, 16 tokens): each test takes well under a
second or two on one CPU core."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import leandit
from leandit.backbones import backbone
from leandit.compress.dynamic import DynamicModel, DynamicSettings
from leandit.compress.dynamic.job import DynamicJob, DynamicTraining
from leandit.compress.dynamic.routers import decide
from leandit.compress.recovery import RecoverySettings
from leandit.diffusion import StepRandom, make_objective
from leandit.models.dit import modulate
from leandit.train import DenoisingJob

from conftest import randomize_, tiny_model

BOTH, TDW, SDT = DynamicSettings(), DynamicSettings(tokens=False), DynamicSettings(width=False)
SETTINGS = {"TDW+SDT": BOTH, "TDW": TDW, "SDT": SDT}


def dense_dit(depth: int = 3, seed: int = 0) -> leandit.DiT:
    """16 tokens of width 32, 4 heads of 8, MLP 128 (4 groups of 32), random weights."""
    return randomize_(tiny_model(hidden_size=32, num_heads=4, depth=depth), std=0.2, seed=seed)


def inputs(n: int = 6, seed: int = 0, t: list[int] | None = None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=gen)  # (N, C, H, W)
    t = torch.tensor(t) if t is not None else torch.linspace(3, 990, n).long()  # (N,) spread over the trajectory
    y = torch.randint(0, 10, (n,), generator=gen)  # (N,)
    return x, t, y


@torch.no_grad()
def mix_routers_(model: DynamicModel, seed: int = 1) -> DynamicModel:
    """Router weights that make mixed decisions: each width router output runs for about half
    of the timesteps (random weights, bias at minus the median logit over 0..999), and each
    token router keeps about half of the tokens (bias at minus the median logit of its inputs)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = model.dynamic_blocks
    if model.settings.width:
        t_emb = model.backbone.t_embedder(torch.arange(0, 1000, 37))  # (28, D), not the test timesteps
        for block in blocks:
            for layer in (block.width_routers.heads, block.width_routers.groups):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen))
                layer.bias.copy_(-(t_emb @ layer.weight.T).median(dim=0).values)
    if model.settings.tokens:
        x, t, y = inputs(8, seed=99)
        for block in blocks:
            net = block.token_router.net
            net[0].weight.copy_(torch.randn(net[0].weight.shape, generator=gen) * 0.5)
            net[0].bias.copy_(torch.randn(net[0].bias.shape, generator=gen) * 0.5)
            net[2].weight.copy_(torch.randn(net[2].weight.shape, generator=gen))
            net[2].bias.zero_()
            seen = []
            handle = block.token_router.register_forward_hook(lambda m, a, out: seen.append(out))
            was = model.training
            model.eval()
            model(x, t, y)  # earlier blocks already mixed: this block's inputs as they will be
            model.train(was)
            handle.remove()
            net[2].bias.copy_(-seen[0].median())
    return model


def mixed_model(settings: DynamicSettings = BOTH, depth: int = 3) -> DynamicModel:
    return mix_routers_(DynamicModel(dense_dit(depth), settings))


# -- 1. all on = the dense model, exactly ---------------------------------------------------

@pytest.mark.parametrize("name", SETTINGS)
def test_fresh_routers_give_exactly_the_dense_model_in_eval_and_in_training(name):
    dense = dense_dit()
    dynamic = DynamicModel(copy.deepcopy(dense), SETTINGS[name])
    x, t, y = inputs()
    dense.eval(), dynamic.eval()
    with torch.no_grad():
        assert torch.equal(dynamic(x, t, y), dense(x, t, y))
    assert dynamic.last_macs.tolist() == [dynamic.macs.dense_total + dynamic.macs.routers] * len(t)

    dense.train(), dynamic.train()
    # Noise as extreme as the uniforms go (1e-6 after clamping): the +15 / +35 biases still win.
    for noise in (torch.rand(len(t), dynamic.noise_size, generator=torch.Generator().manual_seed(0)),
                  torch.zeros(len(t), dynamic.noise_size)):
        out, ref = dynamic(x, t, y, router_noise=noise), dense(x, t, y)
        assert torch.equal(out, ref)
        (out * ref.detach()).sum().backward()
        (ref * ref.detach()).sum().backward()
        grads = {n: p.grad for n, p in dynamic.backbone.named_parameters()}
        for n, p in dense.named_parameters():
            assert torch.equal(grads[n], p.grad), n  # the straight-through masks scale nothing
        dense.zero_grad(), dynamic.zero_grad()


def test_fresh_routers_give_the_dense_loss_through_denoising_and_dynamic_jobs():
    dense = dense_dit()
    dynamic = DynamicModel(copy.deepcopy(dense))
    objective = make_objective(backbone(dense).spec)
    x, _, y = inputs(8)
    batch = (x, y)
    random = lambda: StepRandom(seed=3, step=5, global_batch=8, rank=0, world_size=1, device="cpu")  # noqa: E731
    dense.train(), dynamic.train()
    ref, ref_logs = DenoisingJob(dense, objective).compute_loss(dense, batch, random())
    plain, _ = DenoisingJob(dynamic, objective).compute_loss(dynamic, batch, random())
    assert torch.equal(plain, ref)
    job = DynamicJob(dynamic, DynamicTraining(target=1.0, regions=1), RecoverySettings.from_mix("plain"))
    job.on_step_start(0, 10)
    loss, logs = job.compute_loss(dynamic, batch, random())
    assert job._noise is not None and job._noise.shape == (8, dynamic.noise_size)  # router noise was drawn and used
    assert torch.equal(logs["diffusion"], ref) and torch.equal(logs["mse"], ref_logs["mse"])
    # Every router on costs the routers' own MACs: a little above the dense model.
    ratio = (dynamic.macs.dense_total + dynamic.macs.routers) / dynamic.macs.dense_total
    assert float(logs["macs_ratio"]) == pytest.approx(ratio, rel=1e-12)
    assert float(loss.detach()) == pytest.approx(float(ref.detach()) + (ratio - 1) ** 2, rel=1e-6)


# -- 2. straight-through gradients reach every router, with the right values ---------------

def explicit_forward(dit, x, t, y, head_masks, channel_masks, token_masks):
    """The dense DiT's forward with explicit per-image masks (N, H), (N, Dm), (N, T) per block
    (None: all on); `token_masks[i]` may be a function of the block's residual stream."""
    tokens, c, _ = dit.embed(x, t, y)  # (N, T, D), (N, D)
    for i, block in enumerate(dit.blocks):
        mod = block.modulation(c)
        tokens = tokens + block.attention_branch(tokens, mod, head_masks[i])  # (N, T, D)
        update = block.mlp_branch(tokens, mod, channel_masks[i])  # (N, T, D)
        keep = token_masks[i](tokens) if callable(token_masks[i]) else token_masks[i]
        tokens = tokens + (update if keep is None else keep.unsqueeze(-1) * update)
    return dit.unpatchify(dit.final_layer(tokens, c))  # (N, C_out, H, W)


def gumbel(logits, uniform, tau):
    """(hard 0/1 decisions, d soft / d logits) of the Gumbel-sigmoid at these uniforms."""
    soft = torch.sigmoid((logits + torch.logit(uniform, eps=1e-6)) / tau)
    return (soft > 0.5).to(logits.dtype), soft * (1 - soft) / tau


def test_every_router_gets_a_finite_nonzero_gradient_in_a_mixed_training_step():
    model = mixed_model(BOTH).train()
    x, t, y = inputs()
    noise = torch.rand(len(t), model.noise_size, generator=torch.Generator().manual_seed(5))
    out = model(x, t, y, router_noise=noise)
    kept = torch.stack([b.kept_tokens for b in model.dynamic_blocks], 1)  # (N, L)
    assert ((0 < kept.mean(0)) & (kept.mean(0) < 1)).all()  # every block dropped some tokens and kept others
    macs = model.last_macs
    assert macs.requires_grad and len(set(macs.tolist())) > 1  # images differ
    loss = (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(6))).sum() + model.macs.ratio(macs).mean()
    loss.backward()
    routers = model.router_parameters()
    assert len(routers) == model.depth * 8  # 2 Linear width routers + a 2-layer token router per block
    for name, p in model.dynamic_blocks.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_width_router_gradients_are_the_straight_through_estimate():
    """TDW only: d loss / d bias_k = sum_n d loss / d mask[n, k+1] * sigmoid'((l + g) / tau) / tau,
    with d loss / d mask from autograd on explicit leaf masks of the same values."""
    model = mixed_model(TDW).train()
    dit, tau, n, L, H = model.backbone, model.settings.tau, 6, model.depth, model.num_heads
    x, t, y = inputs(n)
    noise = torch.rand(n, model.noise_size, generator=torch.Generator().manual_seed(7))
    weights = torch.randn(n, 2, 8, 8, generator=torch.Generator().manual_seed(8))
    (model(x, t, y, router_noise=noise) * weights).sum().backward()

    with torch.no_grad():
        t_emb = dit.t_embedder(t)  # (N, D)
    u = noise.reshape(n, 2, L, H - 1)  # heads of every block, then groups of every block
    head_masks, channel_masks, slopes = [], [], []
    for i, block in enumerate(model.dynamic_blocks):
        with torch.no_grad():
            heads, groups = block.width_routers(t_emb)  # (N, H-1) logits each
        hard_h, slope_h = gumbel(heads, u[:, 0, i], tau)
        hard_g, slope_g = gumbel(groups, u[:, 1, i], tau)
        head_masks.append(torch.cat([torch.ones(n, 1), hard_h], 1).requires_grad_())  # (N, H)
        channel_masks.append(torch.cat([torch.ones(n, 1), hard_g], 1).repeat_interleave(model.group_size, 1).requires_grad_())
        slopes.append((slope_h, slope_g))
    decided = torch.stack([m.detach() for m in head_masks])  # (L, N, H)
    assert 0 < decided[:, :, 1:].mean() < 1  # mixed decisions
    assert len({tuple(decided[:, j].flatten().tolist()) for j in range(n)}) > 1  # widths differ with t
    dit.zero_grad()
    out = explicit_forward(dit, x, t, y, head_masks, channel_masks, [None] * L)
    (out * weights).sum().backward()
    for i, block in enumerate(model.dynamic_blocks):
        d_heads = head_masks[i].grad[:, 1:] * slopes[i][0]  # (N, H-1): d loss / d logits
        d_groups = channel_masks[i].grad.reshape(n, H, -1).sum(-1)[:, 1:] * slopes[i][1]
        for layer, d_logits in ((block.width_routers.heads, d_heads), (block.width_routers.groups, d_groups)):
            assert d_logits.abs().sum() > 0
            torch.testing.assert_close(layer.bias.grad, d_logits.sum(0), rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(layer.weight.grad, d_logits.T @ t_emb, rtol=1e-4, atol=1e-7)


def test_token_router_gradient_is_the_straight_through_estimate():
    """TDW+SDT: the last block's token router bias gets sum over images and tokens of
    d loss / d token mask * sigmoid'((l + g) / tau) / tau."""
    model = mixed_model(BOTH).train()
    dit, tau, n, L, H, T = model.backbone, model.settings.tau, 6, model.depth, model.num_heads, model.num_tokens
    x, t, y = inputs(n)
    noise = torch.rand(n, model.noise_size, generator=torch.Generator().manual_seed(9))
    weights = torch.randn(n, 2, 8, 8, generator=torch.Generator().manual_seed(10))
    (model(x, t, y, router_noise=noise) * weights).sum().backward()

    with torch.no_grad():
        t_emb = dit.t_embedder(t)
    width = noise[:, : 2 * L * (H - 1)].reshape(n, 2, L, H - 1)
    token_u = noise[:, 2 * L * (H - 1):].reshape(n, L, T)
    head_masks, channel_masks, token_fns, token_masks, slopes = [], [], [], [], []
    for i, block in enumerate(model.dynamic_blocks):
        with torch.no_grad():
            heads, groups = block.width_routers(t_emb)
        head_masks.append(torch.cat([torch.ones(n, 1), gumbel(heads, width[:, 0, i], tau)[0]], 1))  # (N, H)
        channel_masks.append(torch.cat([torch.ones(n, 1), gumbel(groups, width[:, 1, i], tau)[0]], 1)
                             .repeat_interleave(model.group_size, 1))  # (N, Dm)

        def token_mask(tokens, i=i, router=block.token_router):  # a leaf (N, T) of the router's hard decisions
            with torch.no_grad():
                hard, slope = gumbel(router(tokens), token_u[:, i], tau)
            token_masks.append(hard.requires_grad_())
            slopes.append(slope)
            return hard

        token_fns.append(token_mask)
    out = explicit_forward(dit, x, t, y, head_masks, channel_masks, token_fns)
    (out * weights).sum().backward()
    last = token_masks[-1]
    assert 0 < last.detach().mean() < 1
    d_logits = last.grad * slopes[-1]  # (N, T)
    assert d_logits.abs().sum() > 0
    torch.testing.assert_close(model.dynamic_blocks[-1].token_router.net[2].bias.grad, d_logits.sum().reshape(1),
                               rtol=1e-4, atol=1e-7)


# -- 3. MACs from the decisions = torch's FLOP counter / 2 ----------------------------------

@pytest.mark.parametrize("name", SETTINGS)
def test_mac_count_of_the_decisions_matches_torchs_flop_counter(name):
    from leandit.models.flops import _register_cpu_attention

    _register_cpu_attention()  # else the CPU attention kernel counts as 0
    model = mixed_model(SETTINGS[name]).eval()
    x, t, y = inputs(6)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t, y)
    macs = model.last_macs  # (N,)
    assert counter.get_total_flops() / 2 == pytest.approx(float(macs.sum()), rel=1e-12)
    assert len(set(macs.tolist())) > 1  # the images cost different amounts
    if model.settings.width:
        heads, groups = model.width_decisions(t)  # (N, L, H) each
        assert len({tuple(h.flatten().tolist()) for h in heads}) > 1  # several width patterns in the batch
        assert heads.float().mean() < 1 and groups.float().mean() < 1
    if model.settings.tokens:
        kept = torch.stack([b.kept_tokens for b in model.dynamic_blocks], 1)  # (N, L)
        assert kept.min() < 1 and len(set(kept.flatten().tolist())) > 1  # SDT drops tokens, not equally
    # One image at a time costs the same as in the batch.
    for i in range(len(t)):
        with torch.no_grad(), FlopCounterMode(display=False) as one:
            model(x[i : i + 1], t[i : i + 1], y[i : i + 1])
        assert one.get_total_flops() / 2 == pytest.approx(float(macs[i]), rel=1e-12)
        assert float(model.last_macs[0]) == pytest.approx(float(macs[i]), rel=1e-12)


def test_mac_count_of_the_dense_model_and_the_cheapest_decisions():
    from leandit.models.flops import forward_flops

    model = DynamicModel(dense_dit())
    counter = model.macs
    assert counter.dense_total == forward_flops(model.backbone, 1) // 2
    # Everything off but head 0 and group 0, no token through any MLP: the floor.
    with torch.no_grad():
        for block in model.dynamic_blocks:
            block.width_routers.heads.bias.fill_(-50)
            block.width_routers.groups.bias.fill_(-50)
            block.token_router.net[2].bias.fill_(-100)
    x, t, y = inputs(3)
    with torch.no_grad():
        out = model.eval()(x, t, y)
    assert torch.isfinite(out).all()
    assert counter.ratio(model.last_macs).tolist() == pytest.approx([counter.minimum_ratio()] * 3, rel=1e-12)
    assert 0 < counter.minimum_ratio() < 1


# -- 4. sliced inference = masked training forward -----------------------------------------

@pytest.mark.parametrize("name", SETTINGS)
def test_sliced_inference_equals_the_masked_forward_with_mixed_patterns_in_one_batch(name):
    model = mixed_model(SETTINGS[name])
    x, t, y = inputs(8, t=[5, 5, 400, 999, 120, 700, 5, 999])  # repeated t share a pattern; others differ
    with torch.no_grad():
        masked = model.train()(x, t, y)  # no router noise: decisions are the thresholds
        masked_kept = [b.kept_tokens for b in model.dynamic_blocks]
        masked_macs = model.last_macs
        sliced = model.eval()(x, t, y)
    torch.testing.assert_close(sliced, masked, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.last_macs, masked_macs)
    for block, kept in zip(model.dynamic_blocks, masked_kept):
        if model.settings.tokens:
            assert torch.equal(block.kept_tokens, kept)
        else:
            assert block.kept_tokens is None and kept is None
    if model.settings.tokens:
        kept = torch.stack(masked_kept, 1)  # (N, L)
        assert all(len(set(column.tolist())) > 1 for column in kept.T)  # kept counts differ within the batch
    if model.settings.width:
        heads, _ = model.width_decisions(t)
        patterns = {tuple(h.flatten().tolist()) for h in heads}
        assert len(patterns) >= 3
        # Blocks really ran sliced weights: each distinct non-full pattern is cached once.
        assert all(len(b._slices) >= 1 for b in model.dynamic_blocks)
    # And the sliced model is a different function from the dense one.
    with torch.no_grad():
        assert (sliced - model.backbone(x, t, y)).abs().max() > 1e-3


def test_sliced_weights_follow_updated_weights():
    """A cached slice must not outlive the weights it was cut from: after an in-place update of
    any sliced weight or bias, inference still equals the masked forward."""
    model = mixed_model(TDW).eval()
    x, t, y = inputs(6)
    with torch.no_grad():
        model(x, t, y)  # fill the caches
        block = model.dynamic_blocks[0].block
        for p in (block.attn.proj.weight, block.mlp.fc2.weight, block.attn.qkv.bias, block.mlp.fc1.bias, block.attn.qkv.weight):
            p.mul_(1.5)  # as an optimizer step or load_state_dict does: in place
            sliced = model(x, t, y)  # still in eval mode: nothing cleared the caches
            masked = copy.deepcopy(model).train()(x, t, y)
            torch.testing.assert_close(sliced, masked, rtol=1e-5, atol=1e-5)
