"""Depth gates: straight-through gradients (checked by finite differences), schedules, decisions,
and that the wrapper leaves the backbone as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from leandit.compress.depth import DepthGates, GatedModel, LearnablePruningJob, LearnableSettings, parse_scheme
from leandit.compress.depth.lora import add_lora, plain_state_dict
from leandit.diffusion import StepRandom
from leandit.models.blocks import running_blocks

from conftest import randomize_, tiny_model


def _inputs(n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 1000, (n,), generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return x, t, y


def _gated(depth=4, scheme="1:2", seed=0):
    model = randomize_(tiny_model(depth=depth), std=0.3, seed=seed).double()
    return GatedModel(model, DepthGates(parse_scheme(scheme, depth), logit_init=0.02, logit_scale=100.0).double())


def test_hard_mask_equals_running_only_the_kept_blocks():
    gated = _gated(depth=4)
    x, t, y = _inputs()
    mask = torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    with torch.no_grad():
        out = gated(x, t, y, gate_masks=mask)
        with running_blocks(gated.backbone, [1, 2]):
            expected = gated.backbone(x, t, y)
        assert torch.allclose(out, expected, atol=1e-12)
        # Outside the wrapper the backbone is unchanged: every block runs.
        full = gated.backbone(x, t, y)
        assert not torch.allclose(full, expected)


def test_samples_are_one_hot_per_group_and_independent_per_image():
    gates = DepthGates(parse_scheme("2:4,1:2", 6))
    u = torch.rand(64, gates.num_candidates, generator=torch.Generator().manual_seed(0))
    masks = gates.sample(u, temperature=1.0)
    assert masks.shape == (64, 6)
    assert torch.all((masks == 0) | (masks == 1))
    assert torch.all(masks[:, :4].sum(1) == 2) and torch.all(masks[:, 4:].sum(1) == 1)
    assert len({tuple(m.tolist()) for m in masks}) > 6  # uniform logits: images differ


def _finite_difference(f, value: torch.Tensor, eps=1e-6) -> torch.Tensor:
    grad = torch.zeros_like(value)
    flat = value.view(-1)
    for i in range(flat.numel()):
        keep = flat[i].item()
        flat[i] = keep + eps
        up = f()
        flat[i] = keep - eps
        down = f()
        flat[i] = keep
        grad.view(-1)[i] = (up - down) / (2 * eps)
    return grad


def test_straight_through_gradient_of_the_logits_matches_finite_differences():
    gated = _gated(depth=4, scheme="1:2")
    gates = gated.gates
    with torch.no_grad():
        gates.logits.copy_(torch.tensor([0.01, -0.004, 0.003, 0.0], dtype=torch.float64))
    gated.temperature = 2.0
    x, t, y = _inputs()
    u = torch.rand(3, gates.num_candidates, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    target = torch.randn_like(gated.backbone(x, t, y))

    def loss_of(out):
        return ((out - target) ** 2).mean()

    loss = loss_of(gated(x, t, y, gate_noise=u))
    loss.backward()
    autograd = gates.logits.grad.clone()

    # Independent: dL/dm at the sampled hard masks, by finite differences of the loss in m...
    with torch.no_grad():
        hard = gates.sample(u, gated.temperature).detach().clone()
        dl_dm = _finite_difference(lambda: float(loss_of(gated(x, t, y, gate_masks=hard))), hard)

        # ... times the Jacobian of the soft masks softmax((scale * logits + g) / tau) @ layout.
        gumbel = -torch.log(-torch.log(u))

        def soft_masks():
            scaled = gates.logits * gates.logit_scale
            parts = [torch.softmax((scaled[sl] + gumbel[:, sl]) / gated.temperature, dim=-1) for sl in gates.slices]
            return torch.cat(parts, dim=-1) @ gates.layout.double()

        logits = gates.logits.data
        jac = torch.zeros(*hard.shape, logits.numel(), dtype=torch.float64)
        for k in range(logits.numel()):
            keep = logits[k].item()
            logits[k] = keep + 1e-6
            up = soft_masks()
            logits[k] = keep - 1e-6
            down = soft_masks()
            logits[k] = keep
            jac[..., k] = (up - down) / 2e-6
    expected = torch.einsum("nl,nlk->k", dl_dm, jac)
    assert expected.abs().max() > 1e-3  # a real gradient, not two zeros agreeing
    assert torch.allclose(autograd, expected, rtol=1e-4, atol=1e-7), (autograd, expected)


def test_lora_weights_get_the_gradient_of_the_gated_loss():
    model = randomize_(tiny_model(depth=2), std=0.3).double()
    add_lora(model, rank=2, alpha=4)
    gated = GatedModel(model, DepthGates(parse_scheme("1:2", 2)).double())
    lora_b = gated.backbone.blocks[1].mlp.fc1.lora_B["default"].weight
    lora_a = gated.backbone.blocks[1].mlp.fc1.lora_A["default"].weight
    with torch.no_grad():
        lora_b.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))  # so that A gets a gradient too
    x, t, y = _inputs()
    mask = torch.tensor([1.0, 1.0], dtype=torch.float64)

    def loss():
        return gated(x, t, y, gate_masks=mask).pow(2).mean()

    loss().backward()
    for weight in (lora_a, lora_b):
        with torch.no_grad():
            numeric = _finite_difference(lambda: float(loss()), weight.data)
        assert weight.grad.abs().max() > 1e-5
        assert torch.allclose(weight.grad, numeric, rtol=1e-4, atol=1e-6), (weight.grad - numeric).abs().max()
    # A block gated off gets no gradient at all, as if it were removed.
    gated.zero_grad()
    gated(x, t, y, gate_masks=torch.tensor([1.0, 0.0], dtype=torch.float64)).pow(2).mean().backward()
    assert gated.backbone.blocks[1].mlp.fc1.lora_B["default"].weight.grad.abs().max() == 0


def test_plain_state_dict_discards_or_merges_the_lora_delta():
    # float64 and a seeded LoRA draw: in float32 the merged and unmerged outputs (~20 in size)
    # differ by rounding, and a global-RNG draw made the margin depend on the test order.
    model = randomize_(tiny_model(depth=2), std=0.3).double()
    original = copy.deepcopy(model.state_dict())
    add_lora(model, rank=2, alpha=4)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
    kept = plain_state_dict(model, merge=False)
    assert kept.keys() == original.keys() and all(torch.equal(kept[k], original[k]) for k in kept)
    merged = plain_state_dict(model, merge=True)
    fresh = tiny_model(depth=2).double()
    fresh.load_state_dict(merged)
    x, t, y = _inputs()
    with torch.no_grad():
        assert torch.allclose(fresh(x, t, y), model(x, t, y), rtol=1e-10, atol=1e-10), (fresh(x, t, y) - model(x, t, y)).abs().max()
        assert not torch.allclose(merged["blocks.0.attn.qkv.weight"], original["blocks.0.attn.qkv.weight"])


def test_temperature_anneals_to_its_endpoints_and_the_scale_sharpens():
    job = LearnablePruningJob(tiny_model(depth=4), LearnableSettings(scheme="1:2", recoverability="frozen"))
    job.on_step_start(0, 100)
    assert job.module.temperature == 4.0
    job.on_step_start(99, 100)
    assert job.module.temperature == pytest.approx(0.1)
    job.on_step_start(49, 99)
    assert job.module.temperature == pytest.approx((4.0 + 0.1) / 2)
    gates = job.gates
    with torch.no_grad():
        gates.logits.copy_(torch.tensor([0.05, 0.0, 0.0, 0.02]))
    # scale 100: softmax([5, 0]) and softmax([0, 2])
    assert gates.confidences() == pytest.approx([1 / (1 + torch.exp(torch.tensor(-5.0)).item()), 1 / (1 + torch.exp(torch.tensor(-2.0)).item())])
    assert gates.layer_probabilities().tolist() == pytest.approx([gates.confidences()[0], 1 - gates.confidences()[0],
                                                                  1 - gates.confidences()[1], gates.confidences()[1]], abs=1e-6)


def test_decision_is_the_argmax_of_the_ema_logits():
    job = LearnablePruningJob(tiny_model(depth=6), LearnableSettings(scheme="1:2,2:4", recoverability="frozen"))
    ema = copy.deepcopy(job.module)
    with torch.no_grad():
        job.gates.logits.copy_(torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 1.0]))  # the raw logits disagree
        ema.gates.logits.copy_(torch.tensor([0, 0.03, 0, 0, 0, 0.1, 0, 0]))  # group 2 -> candidate {1, 2}
    decision = job.decision(ema, steps=7)
    assert decision.kept == [1, 3, 4]
    assert decision.groups[0]["kept"] == [1] and decision.groups[1]["kept"] == [3, 4]
    assert decision.groups[1]["confidence"] == pytest.approx(torch.softmax(torch.tensor([0, 0, 10.0, 0, 0, 0]), 0).max().item(), rel=1e-5)
    assert decision.details["steps"] == 7 and decision.details["decided_by"] == "ema_logits"
    assert job.decision(None, 7).kept == [0, 4, 5]  # without EMA: the raw logits


def test_one_gumbel_sample_per_image_from_the_step_randomness():
    job = LearnablePruningJob(randomize_(tiny_model(depth=4)), LearnableSettings(scheme="1:2", recoverability="frozen"))
    seen = []
    job.module.register_forward_hook(lambda m, a, k, o: seen.append(k["gate_noise"].clone()), with_kwargs=True)
    batch = (torch.randn(6, 1, 8, 8), torch.arange(6))
    job.compute_loss(job.module, batch, StepRandom(0, 5, 6, 0, 1, "cpu"))
    job.compute_loss(job.module, batch, StepRandom(0, 5, 6, 0, 1, "cpu"))
    assert seen[0].shape == (6, 4) and torch.equal(seen[0], seen[1])
    # Rank 1 of 2 gets the second half of the same global draw.
    job.compute_loss(job.module, (batch[0][3:], batch[1][3:]), StepRandom(0, 5, 6, 1, 2, "cpu"))
    assert torch.equal(seen[2], seen[0][3:])


def test_hooks_leave_the_backbone_state_dict_and_come_off():
    model = randomize_(tiny_model(depth=2))
    keys = list(model.state_dict())
    gated = GatedModel(model, DepthGates(parse_scheme("1:2", 2)))
    assert [k for k in gated.state_dict() if k.startswith("backbone.")] == [f"backbone.{k}" for k in keys]
    x, t, y = (v.float() if v.is_floating_point() else v for v in _inputs())
    with torch.no_grad():
        gated(x, t, y)
        backbone = gated.remove_hooks()
        assert torch.equal(backbone(x, t, y), model(x, t, y))
        assert all(not block._forward_hooks and "forward" not in vars(block) for block in backbone.blocks)
    ema = copy.deepcopy(GatedModel(randomize_(tiny_model(depth=2)), DepthGates(parse_scheme("1:2", 2))))
    with torch.no_grad():  # the copy's hooks read the copy's masks
        gated_copy = ema(x, t, y, gate_masks=torch.tensor([1.0, 0.0]))
        with running_blocks(ema.backbone, [0]):
            assert torch.allclose(gated_copy, ema.backbone(x, t, y), atol=1e-6)


class TupleBlock(nn.Module):
    """Returns (context, hidden) like SD3/Flux blocks."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, hidden_states, encoder_hidden_states):
        return encoder_hidden_states + self.b(hidden_states), hidden_states + self.a(encoder_hidden_states)


class TupleBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer_blocks = nn.ModuleList(TupleBlock() for _ in range(2))

    def forward(self, hidden, context):
        for block in self.transformer_blocks:
            context, hidden = block(hidden_states=hidden, encoder_hidden_states=context)
        return hidden


def test_blocks_returning_tuples_gate_each_output_against_its_input():
    backbone = TupleBackbone()
    gated = GatedModel(backbone, DepthGates(parse_scheme("1:2", 2)), output_inputs=("encoder_hidden_states", "hidden_states"))
    hidden, context = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    with torch.no_grad():
        out = gated(hidden, context, gate_masks=torch.tensor([0.0, 1.0]))
        c, h = backbone.transformer_blocks[1](hidden_states=hidden, encoder_hidden_states=context)
    assert torch.allclose(out, h)


def test_learnable_pruning_drops_the_blocks_that_wreck_the_output(tmp_path):
    """Blocks 1 and 2 add a huge MLP output: each 1:2 group must learn to keep its other block."""
    from leandit.data import digits_dataset
    from leandit.train import LoopConfig, Trainer

    model = randomize_(tiny_model(depth=4), std=0.05, seed=2)
    with torch.no_grad():
        for i in (1, 2):
            model.blocks[i].adaLN_modulation[-1].bias[5 * 32 :] += 30.0  # gate_mlp
    job = LearnablePruningJob(model, LearnableSettings(scheme="1:2", recoverability="lora", lora_rank=2))
    config = LoopConfig(steps=40, global_batch_size=16, lr=1e-4, ema_decay=0.9, log_every=40, precision="fp32")
    result = Trainer(config, tmp_path, device="cpu", progress=False).fit(job, digits_dataset())
    decision = job.decision(result.ema, result.steps)
    assert decision.kept == [0, 3]
    assert min(g["confidence"] for g in decision.groups) > 0.9  # from 0.5 at the start
