"""leandit's DiT computes the published network: compared with an independent functional
re-computation (`dit_reference.py`) on randomised weights, plus the structural facts the
compression methods rely on (adaLN-Zero identity at init, head/channel masks, token
permutation equivariance), the fixed position embedding and the FLOP count.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import dit_reference as ref
from leandit.models import DiTConfig, build_model
from leandit.models import dit as dit_module
from leandit.models.dit import sincos_pos_embed_2d
from leandit.models.flops import forward_flops

TOL = 1e-5

# Small configs covering patch 2 and 4, learned sigma on and off, several head counts and
# MLP ratios, 1 to 3 blocks, widths 32 to 96, 1 to 4 input channels and both objectives.
CONFIGS = {
    "p2-d32-h2-sigma": DiTConfig(
        input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
        mlp_ratio=4.0, num_classes=10, learn_sigma=True,
    ),
    "p4-d64-h4-nosigma-pixel": DiTConfig(
        input_size=16, patch_size=4, in_channels=3, hidden_size=64, depth=2, num_heads=4,
        mlp_ratio=2.0, num_classes=7, learn_sigma=False, space="pixel",
    ),
    "p2-d96-h3-sigma-flow": DiTConfig(
        input_size=8, patch_size=2, in_channels=4, hidden_size=96, depth=3, num_heads=3,
        mlp_ratio=1.5, num_classes=5, learn_sigma=True, objective="flow",
    ),
    "p4-d48-h6-nosigma": DiTConfig(
        input_size=8, patch_size=4, in_channels=4, hidden_size=48, depth=2, num_heads=6,
        mlp_ratio=3.0, num_classes=3, learn_sigma=False,
    ),
    "p2-d40-h5-1ch": DiTConfig(
        input_size=12, patch_size=2, in_channels=1, hidden_size=40, depth=2, num_heads=5,
        mlp_ratio=2.5, num_classes=10, learn_sigma=True, space="pixel",
    ),
}


def random_model(config: DiTConfig, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ref.randomize_parameters_(build_model(config), seed).eval()


def random_inputs(config: DiTConfig, n: int = 3, seed: int = 1):
    """x, t and y for `config`: integer timesteps for diffusion, t in [0, 1] for flow; the
    labels include the null class."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, config.in_channels, config.input_size, config.input_size, generator=gen)
    if config.objective == "flow":
        t = torch.rand(n, generator=gen)
    else:
        t = torch.randint(0, 1000, (n,), generator=gen)
    y = torch.randint(0, config.num_classes + 1, (n,), generator=gen)
    y[-1] = config.num_classes
    return x, t, y


def reference(model: nn.Module, x, t, y) -> torch.Tensor:
    return ref.reference_dit_forward(
        model.state_dict(), x, t, y, patch_size=model.config.patch_size, num_heads=model.config.num_heads
    )


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------- full forward


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_reference(name):
    config = CONFIGS[name]
    model = random_model(config)
    x, t, y = random_inputs(config)
    with torch.no_grad():
        out = model(x, t, y)
        expected = reference(model, x, t, y)
    assert out.shape == (3, config.out_channels, config.input_size, config.input_size)
    # Randomised weights give an O(1) output, so the tolerance below is a tight one.
    assert 0.05 < expected.abs().mean().item() < 50
    assert max_diff(out, expected) < TOL


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cfg_all_channels_matches_definition(name):
    """Default guidance: every input channel guided, computed here with two separate passes."""
    config = CONFIGS[name]
    model = random_model(config, seed=2)
    x, t, y = random_inputs(config, seed=3)
    y = y % config.num_classes  # real labels only
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, cfg_scale=4.0)
        expected = ref.reference_cfg_general(
            lambda *a: reference(model, *a), x, t, y, 4.0,
            null_class=config.num_classes, in_channels=config.in_channels,
        )
    assert out.shape == (3, config.out_channels, config.input_size, config.input_size)
    assert max_diff(out, expected) < TOL


@pytest.mark.parametrize("name", [k for k, c in CONFIGS.items() if c.in_channels == 4])
def test_cfg_three_channels_matches_original_sampler(name):
    """guided_channels=3 reproduces the original DiT sampler (doubled batch, 3 guided
    channels, the rest of the conditional rows kept as they are)."""
    config = CONFIGS[name]
    model = random_model(config, seed=4)
    x, t, y = random_inputs(config, seed=5)
    y = y % config.num_classes
    null = torch.full_like(y, config.num_classes)
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, cfg_scale=4.0, guided_channels=3)
        original = ref.reference_cfg_original(
            lambda *a: reference(model, *a), torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), 4.0
        )
        all_guided = model.forward_with_cfg(x, t, y, cfg_scale=4.0)
    assert max_diff(out, original[: len(x)]) < TOL
    # The 4th channel really is treated differently from the default (guided) behaviour.
    assert max_diff(out[:, 3], all_guided[:, 3]) > 1e-3
    assert max_diff(out[:, :3], all_guided[:, :3]) < TOL


def test_cfg_without_null_class_is_refused():
    model = build_model(CONFIGS["p2-d32-h2-sigma"].replace(class_dropout_prob=0.0))
    x, t, y = random_inputs(model.config)
    with pytest.raises(ValueError, match="null class"):
        model.forward_with_cfg(x, t, y % 10, cfg_scale=2.0)


def _exact_gelu(model):
    for block in model.blocks:
        block.mlp.act = nn.GELU()


def _sin_cos_swapped(model, monkeypatch):
    def swapped(t, dim, max_period=10000.0):
        emb = ref.timestep_frequencies(t, dim)
        return torch.cat([emb[:, dim // 2:], emb[:, : dim // 2]], dim=1)

    monkeypatch.setattr(dit_module, "timestep_embedding", swapped)


def _rows_and_columns_swapped(model):
    d = model.config.hidden_size
    g = math.isqrt(model.config.num_tokens)
    pos = model.pos_embed.data.reshape(g, g, d).transpose(0, 1).reshape(1, g * g, d).clone()
    model.pos_embed.data.copy_(pos)


@pytest.mark.parametrize("mutation", ["exact-gelu", "sin-cos-order", "transposed-positions"])
def test_comparison_detects_small_deviations(mutation, monkeypatch):
    """The comparison above is not vacuous: plausible near-misses of the architecture (exact
    instead of tanh GELU, [sin, cos] timestep features, a transposed token grid) move the
    output far beyond the tolerance."""
    config = CONFIGS["p2-d96-h3-sigma-flow"]
    model = random_model(config, seed=6)
    x, t, y = random_inputs(config, seed=7)
    with torch.no_grad():
        expected = reference(model, x, t, y)
        if mutation == "exact-gelu":
            _exact_gelu(model)
        elif mutation == "sin-cos-order":
            _sin_cos_swapped(model, monkeypatch)
        else:
            _rows_and_columns_swapped(model)
        assert max_diff(model(x, t, y), expected) > 10 * TOL


# --------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fresh_model_blocks_are_identity(name):
    """adaLN-Zero: every block of a freshly built model returns its input bit for bit, with
    or without masks, and the zeroed output layer makes the whole model output zero."""
    config = CONFIGS[name]
    torch.manual_seed(0)
    model = build_model(config)
    n, tokens, d = 2, config.num_tokens, config.hidden_size
    x = torch.randn(n, tokens, d) * 3
    c = torch.randn(n, d) * 3
    head_mask = torch.zeros(config.num_heads)
    with torch.no_grad():
        for block in model.blocks:
            assert torch.equal(block(x, c), x)
            assert torch.equal(block(x, c, head_mask=head_mask), x)
        xi, t, y = random_inputs(config)
        assert torch.equal(model(xi, t, y), torch.zeros(3, config.out_channels, *xi.shape[2:]))
    # ...but only because of the zeroed modulation: the rest of the block is not trivial.
    ref.randomize_parameters_(model.blocks[0].adaLN_modulation, seed=1)
    with torch.no_grad():
        assert max_diff(model.blocks[0](x, c), x) > 1e-2


def _block_setup(seed: int = 8):
    """A 4-head block on a 6 x 6 token grid, randomised, with random tokens and conditioning."""
    config = DiTConfig(
        input_size=12, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
        mlp_ratio=2.0, num_classes=7,
    )
    model = random_model(config, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, config.num_tokens, config.hidden_size, generator=gen)
    c = torch.randn(3, config.hidden_size, generator=gen)
    return config, model.blocks[1], x, c


def test_block_matches_reference_block():
    config, block, x, c = _block_setup()
    with torch.no_grad():
        expected = ref.block_forward(block.state_dict(), "", x, c, config.num_heads)
        assert max_diff(block(x, c), expected) < TOL


def test_head_and_channel_masks_match_reference():
    """Per-model (K,) and per-sample (N, K) masks zero exactly the masked heads/channels."""
    config, block, x, c = _block_setup()
    gen = torch.Generator().manual_seed(9)
    k, dm = config.num_heads, config.mlp_hidden
    per_model_heads = torch.tensor([1.0, 0.0, 1.0, 0.0])
    per_sample_heads = (torch.rand(3, k, generator=gen) > 0.5).float()
    per_model_channels = (torch.rand(dm, generator=gen) > 0.3).float()
    per_sample_channels = (torch.rand(3, dm, generator=gen) > 0.5).float()
    sd = block.state_dict()
    with torch.no_grad():
        unmasked = block(x, c)
        for hm, cm in [
            (per_model_heads, None),
            (None, per_model_channels),
            (per_sample_heads, per_sample_channels),
            (per_model_heads, per_sample_channels),
        ]:
            out = block(x, c, head_mask=hm, channel_mask=cm)
            expected = ref.block_forward(sd, "", x, c, k, head_mask=hm, channel_mask=cm)
            assert max_diff(out, expected) < TOL
            assert max_diff(out, unmasked) > 1e-3  # the masks did something
        # An all-ones mask is the same as no mask.
        ones = block(x, c, head_mask=torch.ones(k), channel_mask=torch.ones(dm))
        assert max_diff(ones, unmasked) < 1e-6


def test_masks_equal_removing_the_weights():
    """A second, weight-level formulation: masking head j equals zeroing the output
    projection's input columns of head j; masking an MLP channel equals zeroing its fc2
    column. This is what pruning a head or channel from a checkpoint does."""
    config, block, x, c = _block_setup()
    dh = config.hidden_size // config.num_heads
    head_mask = torch.tensor([0.0, 1.0, 1.0, 0.0])
    channel_mask = torch.ones(config.mlp_hidden)
    channel_mask[::3] = 0
    with torch.no_grad():
        masked = block(x, c, head_mask=head_mask, channel_mask=channel_mask)
        for j in torch.nonzero(head_mask == 0).flatten().tolist():
            block.attn.proj.weight[:, j * dh:(j + 1) * dh] = 0
        block.mlp.fc2.weight[:, channel_mask == 0] = 0
        pruned = block(x, c)
    assert max_diff(masked, pruned) < TOL


def test_block_is_token_permutation_equivariant():
    """A block has no positional input: permuting the tokens permutes its output, and it can
    run on any token subset (gather, block, scatter) exactly as attention over that subset."""
    config, block, x, c = _block_setup()
    perm = torch.randperm(config.num_tokens, generator=torch.Generator().manual_seed(3))
    subset = perm[: config.num_tokens // 3]
    with torch.no_grad():
        full = block(x, c)
        assert max_diff(block(x[:, perm], c), full[:, perm]) < TOL
        on_subset = block(x[:, subset], c)
        expected = ref.block_forward(block.state_dict(), "", x[:, subset], c, config.num_heads)
        assert max_diff(on_subset, expected) < TOL
        # Attending over a subset is not the same as the full computation restricted to it.
        assert max_diff(on_subset, full[:, subset]) > 1e-3


# --------------------------------------------------------------------------- positions, FLOPs


@pytest.mark.parametrize("hidden_size,grid", [(32, 4), (64, 2), (96, 4), (40, 6)])
def test_fresh_pos_embed_is_2d_sincos(hidden_size, grid):
    heads = {32: 2, 64: 4, 96: 3, 40: 5}[hidden_size]
    config = DiTConfig(input_size=grid * 2, patch_size=2, hidden_size=hidden_size, num_heads=heads, depth=1)
    model = build_model(config)
    expected = ref.reference_pos_embed(hidden_size, grid).float()
    assert model.pos_embed.shape == (1, grid * grid, hidden_size)
    assert max_diff(model.pos_embed[0], expected) < 1e-6


def test_dit_xl_pos_embed_is_2d_sincos():
    expected = ref.reference_pos_embed(1152, 16)
    assert max_diff(torch.from_numpy(sincos_pos_embed_2d(1152, 16)), expected) < 1e-6


def analytic_macs(config: DiTConfig) -> int:
    """Multiply-accumulates of one forward of one sample: every matmul and the patch
    convolution (element-wise ops, norms and softmax are not counted, as in the DiT paper)."""
    d, t, p = config.hidden_size, config.num_tokens, config.patch_size
    dm = config.mlp_hidden
    patch_embed = t * d * config.in_channels * p * p
    timestep = 256 * d + d * d
    per_block = (
        d * 6 * d  # adaLN modulation
        + t * d * 3 * d  # qkv
        + 2 * t * t * d  # Q K^T and A V over all heads
        + t * d * d  # output projection
        + 2 * t * d * dm  # fc1, fc2
    )
    final = d * 2 * d + t * d * p * p * config.out_channels
    return patch_embed + timestep + config.depth * per_block + final


def test_dit_xl2_flops_match_paper():
    """The DiT paper reports 118.6 Gflops (multiply-accumulates) for DiT-XL/2 at 256px."""
    with torch.device("meta"):
        model = build_model("DiT-XL/2")
    macs = forward_flops(model) / 2
    assert abs(macs - 118.6e9) < 0.1e9
    assert macs == analytic_macs(model.config)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_flops_match_analytic_formula(name):
    config = CONFIGS[name]
    model = build_model(config)
    assert forward_flops(model) == 2 * analytic_macs(config)
    assert forward_flops(model, batch_size=3) == 3 * 2 * analytic_macs(config)
