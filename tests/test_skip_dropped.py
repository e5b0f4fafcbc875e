"""Skipping the backward of images whose gate is 0 changes no number: the gradients of the
logits, LoRA or full weights and the inputs, and the weights after an AdamW step, equal those
of the plain gated forward (float64 on a tiny model), for 1:2, 2:4 and mixed schemes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from leandit.compress.depth import DepthGates, GatedModel, LearnablePruningJob, LearnableSettings, parse_scheme
from leandit.diffusion import StepRandom

from conftest import randomize_, tiny_model

SCHEMES = [("1:2", 4), ("2:4", 4), ("1:2,2:4", 6)]


def _close(a: torch.Tensor | None, b: torch.Tensor | None, rel: float = 1e-10) -> bool:
    """Equal up to float64 rounding, relative to the tensor's scale (None = no gradient)."""
    if a is None or b is None:
        return a is None and b is None
    return bool((a - b).abs().max() <= rel * max(a.abs().max(), 1e-3))


def _job(scheme: str, depth: int, recoverability: str, skip: str) -> LearnablePruningJob:
    torch.manual_seed(0)  # the same LoRA initialisation in both jobs
    model = randomize_(tiny_model(depth=depth), std=0.3, seed=1).double()
    job = LearnablePruningJob(model, LearnableSettings(scheme=scheme, recoverability=recoverability, skip_dropped_backward=skip))
    job.module.double()
    job.setup(torch.device("cpu"))
    with torch.no_grad():  # logits apart from uniform, so the draws mix kept and dropped images
        job.gates.logits.copy_(torch.linspace(-0.01, 0.01, job.gates.num_candidates, dtype=torch.float64))
    return job


def _step(job: LearnablePruningJob, split_seen: list | None = None):
    gen = torch.Generator().manual_seed(3)
    batch = (torch.randn(8, 1, 8, 8, generator=gen, dtype=torch.float64), torch.randint(0, 10, (8,), generator=gen))
    params = [p for g in job.parameter_groups() for p in g["params"]]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    job.module.temperature = 0.7
    loss, _ = job.compute_loss(job.module, batch, StepRandom(0, 2, 8, 0, 1, "cpu"))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in job.module.named_parameters() if p.grad is not None}
    optimizer.step()
    weights = {name: p.detach().clone() for name, p in job.module.named_parameters()}
    return loss.detach(), grads, weights


@pytest.mark.parametrize("scheme,depth", SCHEMES)
@pytest.mark.parametrize("recoverability", ["lora", "full", "frozen"])
def test_skipping_the_dropped_backward_changes_no_gradient_and_no_update(scheme, depth, recoverability):
    plain, skipping = _job(scheme, depth, recoverability, "off"), _job(scheme, depth, recoverability, "on")
    assert not plain.module.skip_dropped and skipping.module.skip_dropped
    splits = []
    original = GatedModel._split_rows
    GatedModel._split_rows = staticmethod(lambda masks: splits.append(r := original(masks)) or r)
    try:
        loss_a, grads_a, weights_a = _step(plain)
        loss_b, grads_b, weights_b = _step(skipping)
    finally:
        GatedModel._split_rows = staticmethod(original)
    # The skipping job really split: some block ran some images without a graph.
    assert len(splits) == 1 and any(rows is not None and len(rows[1]) for rows in splits[0])
    assert torch.allclose(loss_a, loss_b, rtol=0, atol=1e-13)
    assert grads_a.keys() == grads_b.keys() and "gates.logits" in grads_a
    assert (recoverability == "frozen") == (len(grads_a) == 1)
    for name in grads_a:
        assert _close(grads_a[name], grads_b[name]), name
    # Adam's first update is lr * g / (|g| + eps): a gradient that is 0 in exact arithmetic
    # (the key bias: softmax ignores it) is rounding noise of ~1e-15 in both runs, which eps
    # (1e-8) turns into a move of up to lr * 1e-13 / eps = 1e-7, 1e5 times below the lr-sized step.
    for name in weights_a:
        assert torch.allclose(weights_a[name], weights_b[name], rtol=1e-10, atol=1e-7), name


def test_the_input_and_weight_gradients_of_given_masks_are_unchanged():
    model = randomize_(tiny_model(depth=4), std=0.3, seed=2).double()
    gated = {skip: GatedModel(copy.deepcopy(model), DepthGates(parse_scheme("1:2", 4)).double(), skip_dropped=skip)
             for skip in (False, True)}
    masks = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0], [1, 0, 1, 0]], dtype=torch.float64)
    t, y = torch.tensor([5, 500, 900]), torch.tensor([1, 2, 3])
    grads = {}
    for skip, g in gated.items():
        x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64, requires_grad=True)
        g.backbone.requires_grad_(True)
        g(x, t, y, gate_masks=masks).square().sum().backward()
        grads[skip] = (x.grad, {n: p.grad for n, p in g.backbone.named_parameters()})
    assert _close(grads[False][0], grads[True][0])
    for name, grad in grads[False][1].items():
        assert _close(grad, grads[True][1][name]), name


class _TupleBlock(nn.Module):
    """Returns (context, hidden) like SD3/Flux blocks; `rotary` is (tokens, dim), not per image."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, hidden_states, encoder_hidden_states, image_rotary_emb):
        return encoder_hidden_states + self.b(hidden_states * image_rotary_emb), hidden_states + self.a(encoder_hidden_states)


class _TupleBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer_blocks = nn.ModuleList(_TupleBlock() for _ in range(2))

    def forward(self, hidden, context):
        rotary = torch.linspace(0.5, 1.5, 4).expand(3, 4)  # 3 tokens = the batch size, by design
        for block in self.transformer_blocks:
            context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, image_rotary_emb=rotary)
        return hidden


def test_tuple_blocks_split_their_keyword_inputs_but_not_the_rotary_table():
    torch.manual_seed(0)
    base = _TupleBackbone().double()
    hidden, context = torch.randn(3, 3, 4, dtype=torch.float64), torch.randn(3, 3, 4, dtype=torch.float64)
    masks = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    grads = []
    for skip in (False, True):
        g = GatedModel(copy.deepcopy(base), DepthGates(parse_scheme("1:2", 2)).double(),
                       output_inputs=("encoder_hidden_states", "hidden_states"), skip_dropped=skip)
        out = g(hidden, context, gate_masks=masks)
        out.sum().backward()
        grads.append((out.detach(), [p.grad for p in g.backbone.parameters()]))
    assert _close(grads[0][0], grads[1][0])
    assert sum(a is not None for a in grads[0][1]) >= 3  # not a vacuous comparison
    for a, b in zip(grads[0][1], grads[1][1]):
        assert _close(a, b)


def test_blocks_with_active_dropout_are_not_split():
    class DropBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.drop = nn.Linear(4, 4), nn.Dropout(0.5)

        def forward(self, x):
            return self.drop(self.fc(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(DropBlock() for _ in range(2))

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    x, masks = torch.randn(4, 4), torch.tensor([[1.0, 0.0], [0.0, 1.0]] * 2)
    outs = []
    for skip in (False, True):
        torch.manual_seed(5)
        net = Net()
        g = GatedModel(net, DepthGates(parse_scheme("1:2", 2)), skip_dropped=skip)
        outs.append(g(x, gate_masks=masks))
    assert torch.equal(outs[0], outs[1])  # the same dropout draws: one whole-batch call per block


def test_auto_skips_on_cpu_and_the_option_is_checked():
    job = LearnablePruningJob(randomize_(tiny_model(depth=2)), LearnableSettings(recoverability="frozen"))
    job.setup(torch.device("cpu"))
    assert job.module.skip_dropped
    with pytest.raises(ValueError, match="skip_dropped_backward"):
        LearnableSettings(skip_dropped_backward="sometimes")
