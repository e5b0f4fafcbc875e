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
from leandit.compress.dynamic.saving import decode_width_table
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
        t_emb = model.backbone.t_embedder(torch.arange(0, 1000, 37) + 0.5)  # (28, D): no test timestep is a tie
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


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("name", SETTINGS)
def test_mac_count_of_the_dense_model_and_the_cheapest_decisions(name):
    from leandit.models.flops import forward_flops

    model = DynamicModel(dense_dit(), SETTINGS[name])
    counter = model.macs
    assert counter.dense_total == forward_flops(model.backbone, 1) // 2
    # Every router as closed as it goes: head 0 and group 0 only, no token through an MLP
    # (with only one of TDW / SDT, the other stays dense): the floor minimum_ratio() promises.
    with torch.no_grad():
        for block in model.dynamic_blocks:
            if block.width_routers is not None:
                block.width_routers.heads.bias.fill_(-50)
                block.width_routers.groups.bias.fill_(-50)
            if block.token_router is not None:
                block.token_router.net[2].bias.fill_(-100)
    x, t, y = inputs(3)
    from leandit.models.flops import _register_cpu_attention

    _register_cpu_attention()
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        out = model.eval()(x, t, y)
    assert torch.isfinite(out).all()
    floor = counter.minimum_ratio()
    assert counter.ratio(model.last_macs).tolist() == pytest.approx([floor] * 3, rel=1e-12)
    assert flops.get_total_flops() / 2 / 3 / counter.dense_total == pytest.approx(floor, rel=1e-12)
    assert 0 < floor < 1


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


# -- 5. the model folder: routers, the width table, EMA ------------------------------------

def test_routers_and_width_table_round_trip_through_the_model_folder(tmp_path):
    model = mixed_model(BOTH)
    folder = leandit.save_model(model, tmp_path / "model")
    assert (folder / "wrapper-0-dydit.safetensors").exists()
    loaded = leandit.load_model(folder)
    assert isinstance(loaded, DynamicModel) and loaded.settings == model.settings
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    table = model.width_table()
    assert loaded.width_table() == table
    assert len(table["timesteps"]) == 1000 and len(table["heads"]) == model.depth
    assert len({h for row in table["heads"] for h in row}) > 1  # the table is not trivial
    import json

    saved = json.loads((folder / "config.json").read_text())["wrappers"][0]["table"]
    assert decode_width_table(saved["width_table"]) == table and saved["settings"] == {"width": True, "tokens": True, "tau": 5.0}
    x, t, y = inputs(6)
    with torch.no_grad():
        noise = torch.rand(6, model.noise_size)
        assert torch.equal(loaded.train()(x, t, y, router_noise=noise), model.train()(x, t, y, router_noise=noise))
        # Inference computes the adaLN modulation per width pattern (a few images at a time), where
        # the float summation order of a matrix-vector product follows the weights' memory
        # alignment (a loaded folder's tensors sit at other offsets): equal to float tolerance.
        same(loaded.eval()(x, t, y), model.eval()(x, t, y))
        assert torch.equal(loaded.last_macs, model.last_macs)
    # The backbone's own files stay a plain model: the dense model loads from them alone.
    assert not any("router" in k for k in leandit.load_model(folder, weights="model").backbone.state_dict())


@pytest.mark.parametrize("name", ["TDW", "SDT"])
def test_one_sided_settings_round_trip(tmp_path, name):
    model = mixed_model(SETTINGS[name])
    loaded = leandit.load_model(leandit.save_model(model, tmp_path / "model"))
    assert loaded.settings == model.settings
    x, t, y = inputs(4)
    with torch.no_grad():
        same(loaded.eval()(x, t, y), model.eval()(x, t, y))
        assert torch.equal(loaded.last_macs, model.last_macs)


def test_ema_weights_of_a_dynamic_model_cover_its_routers(tmp_path):
    model = mixed_model(BOTH)
    ema = mix_routers_(copy.deepcopy(model), seed=7)  # other routers, other widths
    with torch.no_grad():
        for p in ema.backbone.parameters():
            p.mul_(0.9)
    assert ema.width_table() != model.width_table()
    folder = leandit.save_model(model, tmp_path / "model", ema=ema)
    auto, raw = leandit.load_model(folder), leandit.load_model(folder, weights="model")
    for loaded, source in ((auto, ema), (raw, model)):
        assert all(torch.equal(v, source.state_dict()[k]) for k, v in loaded.state_dict().items())
        assert loaded.width_table() == source.width_table()
    x, t, y = inputs(4)
    with torch.no_grad():
        same(auto.eval()(x, t, y), ema.eval()(x, t, y))
        assert torch.equal(auto.last_macs, ema.last_macs)


def test_the_folders_width_table_describes_the_model_load_model_gives(tmp_path):
    """The table stored in the folder (runs of timesteps per block, as a person reads them) is
    that of the weights load_model gives by default: the EMA's when saved with one."""
    import json

    from leandit.compress.dynamic.saving import decode_width_table

    model = mixed_model(BOTH)
    ema = mix_routers_(copy.deepcopy(model), seed=7)
    assert ema.width_table() != model.width_table()
    folder = leandit.save_model(model, tmp_path / "model", ema=ema)
    saved = json.loads((folder / "config.json").read_text())["wrappers"][0]["table"]["width_table"]
    assert decode_width_table(saved) == leandit.load_model(folder).width_table()


# -- 7. bad inputs: one-line errors -------------------------------------------------------

def one_line(err) -> str:
    text = str(err.value)
    assert text and "\n" not in text, text
    return text


@pytest.mark.parametrize("target", [0.0, -0.5, 1.5, float("nan"), float("inf")])
def test_a_target_outside_zero_to_one_is_refused(target):
    with pytest.raises(ValueError) as err:
        DynamicTraining(target=target)
    assert "(0, 1]" in one_line(err)


def test_a_target_below_what_the_model_can_reach_is_refused():
    model = DynamicModel(dense_dit())
    floor = model.macs.minimum_ratio()
    with pytest.raises(ValueError) as err:
        DynamicJob(model, DynamicTraining(target=floor * 0.9), RecoverySettings.from_mix("plain"))
    assert "below what this model can reach" in one_line(err)
    DynamicJob(model, DynamicTraining(target=min(1.0, floor * 1.01)), RecoverySettings.from_mix("plain"))
    # Without token skipping the floor is higher (every token goes through group 0's MLP), and
    # a target between the two floors is refused for a TDW-only model.
    width_only = DynamicModel(dense_dit(), TDW)
    assert width_only.macs.minimum_ratio() > floor * 1.05
    with pytest.raises(ValueError) as err:
        DynamicJob(width_only, DynamicTraining(target=floor * 1.05), RecoverySettings.from_mix("plain"))
    assert "at every token" in one_line(err)


def without_timestep_embedding(monkeypatch) -> None:
    """diffusers' DiT as if its layout named no timestep embedder (an architecture whose adapter
    exposes none)."""
    import dataclasses

    from leandit.backbones import LAYOUTS

    layout = LAYOUTS["DiTTransformer2DModel"]
    monkeypatch.setitem(LAYOUTS, "DiTTransformer2DModel", dataclasses.replace(layout, timestep_embedder=""))


def test_a_model_without_a_timestep_embedding_cannot_have_dynamic_width(monkeypatch):
    from diffusers_models import tiny_diffusers_dit

    from leandit.backbones import backbone as adapter_of

    without_timestep_embedding(monkeypatch)
    model = tiny_diffusers_dit(depth=2)
    with pytest.raises(ValueError) as expected:
        adapter_of(model).timestep_embedding(torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError) as err:
        DynamicModel(model)
    assert one_line(err) == one_line(expected) and "timestep embedding" in str(err.value)
    assert DynamicModel(model, SDT).settings == SDT  # token routers need no timestep embedding


def test_bad_router_noise_and_settings_are_refused():
    model = DynamicModel(dense_dit()).train()
    x, t, y = inputs(2)
    with pytest.raises(ValueError) as err:
        model(x, t, y, router_noise=torch.rand(2, model.noise_size - 1))
    assert str(model.noise_size) in one_line(err)
    with pytest.raises(ValueError):
        DynamicSettings(width=False, tokens=False)
    with pytest.raises(ValueError):
        DynamicSettings(tau=0.0)
    with pytest.raises(ValueError):
        DynamicSettings(tau=float("nan"))


def test_a_dynamic_jobs_state_resumes_and_refuses_changed_settings():
    model = DynamicModel(dense_dit())
    plain = RecoverySettings.from_mix("plain")
    state = DynamicJob(model, DynamicTraining(target=0.6), plain).state_dict()
    DynamicJob(model, DynamicTraining(target=0.6), plain).load_state_dict(copy.deepcopy(state))  # the same run resumes
    DynamicJob(model, DynamicTraining(target=0.6), plain).load_state_dict({})  # a fresh run
    with pytest.raises(ValueError) as err:
        DynamicJob(model, DynamicTraining(target=0.5), plain).load_state_dict(copy.deepcopy(state))
    assert "DyDiT settings (target)" in one_line(err)
    with pytest.raises(ValueError) as err:
        DynamicJob(DynamicModel(dense_dit(), TDW), DynamicTraining(target=0.6), plain).load_state_dict(copy.deepcopy(state))
    assert "DyDiT settings (tokens)" in one_line(err)
    with pytest.raises(ValueError) as err:
        DynamicJob(model, DynamicTraining(target=0.6), RecoverySettings.from_mix("plain", diffusion_weight=2.0)).load_state_dict(state)
    assert "recovery settings (diffusion_weight)" in one_line(err)


@pytest.fixture
def saved_dynamic(tmp_path):
    model = mixed_model(BOTH, depth=2)
    folder = leandit.save_model(model, tmp_path / "model")
    return folder, folder / "wrapper-0-dydit.safetensors"


def _refused(folder, *words) -> None:
    with pytest.raises(leandit.models.infer.CheckpointError) as err:
        leandit.load_model(folder)
    text = one_line(err)
    assert all(w in text for w in words), text


def test_a_truncated_router_file_is_a_one_line_checkpoint_error(saved_dynamic):
    folder, routers = saved_dynamic
    data = routers.read_bytes()
    routers.write_bytes(data[: len(data) // 2])
    _refused(folder, "wrapper-0-dydit.safetensors")
    routers.write_bytes(b"")
    _refused(folder, "wrapper-0-dydit.safetensors")


def test_a_garbled_router_file_is_a_one_line_checkpoint_error(saved_dynamic):
    folder, routers = saved_dynamic
    data = bytearray(routers.read_bytes())
    data[8:40] = b"\xff" * 32  # inside the JSON header
    routers.write_bytes(bytes(data))
    _refused(folder, "wrapper-0-dydit.safetensors")


def test_router_files_of_the_wrong_shape_or_keys_or_with_nan_are_one_line_checkpoint_errors(saved_dynamic):
    from safetensors.torch import load_file, save_file

    folder, routers = saved_dynamic
    good = load_file(str(routers))
    key = "0.width_routers.heads.weight"
    assert key in good, sorted(good)
    save_file({**good, key: torch.zeros(5, 32)}, str(routers))
    _refused(folder, "mis-shaped", key)
    save_file({k: v for k, v in good.items() if k != key}, str(routers))
    _refused(folder, "missing", key)
    save_file({**good, key: torch.full_like(good[key], float("nan"))}, str(routers))
    _refused(folder, "NaN")
    # The router file of a deeper model.
    other = leandit.save_model(DynamicModel(dense_dit(depth=3)), folder.parent / "deeper")
    routers.write_bytes((other / "wrapper-0-dydit.safetensors").read_bytes())
    _refused(folder, "unexpected")
    routers.unlink()
    _refused(folder, "wrapper-0-dydit.safetensors")


def test_a_damaged_dydit_table_is_a_one_line_checkpoint_error(saved_dynamic):
    import json

    folder, _ = saved_dynamic
    config = json.loads((folder / "config.json").read_text())
    config["wrappers"][0]["table"]["settings"] = {"width": True, "tokens": True, "temperature": 5}
    (folder / "config.json").write_text(json.dumps(config))
    _refused(folder, "DyDiT table")
    config["wrappers"][0]["table"]["settings"] = {"width": False, "tokens": False, "tau": 5}
    (folder / "config.json").write_text(json.dumps(config))
    _refused(folder, "DyDiT table")


def test_a_flow_model_is_dynamic_over_continuous_time(tmp_path):
    """SiT: t in [0, 1] feeds the same embedder; the width table spans 1000 points of [0, 1]."""
    sit = randomize_(tiny_model(hidden_size=32, num_heads=4, depth=2, objective="flow", learn_sigma=False), std=0.2)
    model = DynamicModel(sit)
    with torch.no_grad():
        t_emb = sit.t_embedder(torch.linspace(0.0005, 0.9995, 40))
        for block in model.dynamic_blocks:
            for layer in (block.width_routers.heads, block.width_routers.groups):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(3)))
                layer.bias.copy_(-(t_emb @ layer.weight.T).median(dim=0).values)
    x, _, y = inputs(6)
    t = torch.tensor([0.01, 0.2, 0.4, 0.6, 0.8, 0.99])
    with torch.no_grad():
        masked = model.train()(x, t, y)
        sliced = model.eval()(x, t, y)
    same(sliced, masked)
    table = model.width_table()
    assert len(table["timesteps"]) == 1000 and table["timesteps"][0] == 0.0 and table["timesteps"][-1] == 1.0
    assert len({h for row in table["heads"] for h in row}) > 1
    assert leandit.load_model(leandit.save_model(model, tmp_path / "sit")).width_table() == table


def test_the_slice_cache_is_bounded_and_reslices_changed_weights():
    """At most `capacity` width patterns stay sliced (least recently used out), and an
    in-place weight update is never served from an old slice."""
    from leandit.compress.dynamic.slices import SliceCache

    weight = torch.randn(4, 3)
    cache = SliceCache(capacity=2)
    cuts = []

    def cut(rows):
        return lambda: (cuts.append(rows) or weight[list(rows)].clone(),)

    for rows in ((0,), (1,), (0,), (2,), (0,)):
        cache.get(rows, [weight], cut(rows))
    assert cuts == [(0,), (1,), (2,)] and len(cache) == 2  # (0,) reused, (1,) evicted when (2,) came
    with torch.no_grad():
        weight.add_(1.0)
    (fresh,) = cache.get((0,), [weight], cut((0,)))
    assert torch.equal(fresh, weight[[0]]) and len(cache) == 1  # the old weights' slices are dropped
