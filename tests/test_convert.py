"""`leandit convert` and models/diffusers_dit.py: leandit's DiT (the original release's layout)
<-> diffusers' DiTTransformer2DModel.

- diffusers -> leandit is exact: the same weights and the same computation (time shift 1 and
  diffusers' norm_eps carried in the config). Measured max |diff| of outputs: 0 in memory,
  1.2e-7 when one side's weights are memory-mapped from a file (BLAS takes another kernel
  for unaligned weights); asserted <= EXACT_TOL.
- leandit/original -> diffusers copies the weights exactly; the outputs differ only through
  diffusers' fixed time-embedding shift 1 (the original's is 0). Measured on these tiny
  models with DiT-like weights (`dit_like_`): max |diff| 4.92e-4 over t in 0..999 (0 at
  t = 0), mean 4.5e-5, for outputs of mean |value| ~0.08; asserted <= SHIFT_TOL. DiT-XL/2-sized
  numbers: benchmarks/convert_dit.md.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DiTTransformer2DModel

import leandit
from leandit.cli import main
from leandit.models import CheckpointError, DiTConfig
from leandit.models.diffusers_dit import (
    diffusers_config,
    diffusers_state_dict_to_dit,
    diffusers_to_dit,
    dit_state_dict_to_diffusers,
    dit_to_diffusers,
)

from conftest import randomize_, run_cli, tiny_model

EXACT_TOL = 1e-6  # measured 0 .. 1.2e-7
SHIFT_TOL = 5e-4  # measured max 4.92e-4 (4 channels, no sigma), see the module docstring
VARIANTS = [(1, True), (1, False), (4, True), (4, False)]  # (in_channels, learn_sigma)


def dit_like_(model: leandit.DiT, seed: int = 0, std: float = 0.02) -> leandit.DiT:
    """The DiT initialisation, then N(0, std) for the layers adaLN-Zero starts at zero (the
    modulations and the output layer): weights of a realistic scale with nonzero outputs."""
    torch.manual_seed(seed)
    model.initialize_weights()
    gen = torch.Generator().manual_seed(seed)
    zero_init = [*(b.adaLN_modulation[-1] for b in model.blocks), model.final_layer.adaLN_modulation[-1], model.final_layer.linear]
    with torch.no_grad():
        for layer in zero_init:
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def inputs(config: DiTConfig, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, config.in_channels, config.input_size, config.input_size, generator=gen)  # (N, C, H, W)
    t = torch.tensor([0, 1, 10, 100, 250, 500, 750, 999])  # (N,)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 9, config.num_classes])  # (N,), the last one the null class
    return x, t, y


@torch.no_grad()
def max_diff(dit: leandit.DiT, diffusers_model, config: DiTConfig) -> float:
    x, t, y = inputs(config)
    return (dit(x, t, y) - diffusers_model(x, t, y).sample).abs().max().item()


def random_diffusers(in_channels: int = 4, learn_sigma: bool = True, seed: int = 0, **overrides) -> DiTTransformer2DModel:
    """A tiny diffusers DiT with random weights and, as in every real one, the same embedder in
    every block."""
    fields = dict(num_attention_heads=2, attention_head_dim=16, in_channels=in_channels, num_layers=2, sample_size=8,
                  patch_size=2, num_embeds_ada_norm=10, out_channels=2 * in_channels if learn_sigma else in_channels)
    model = randomize_(DiTTransformer2DModel(**{**fields, **overrides}), std=0.2, seed=seed).eval()
    first = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(first.state_dict())
    return model


# ----------------------------------------------------------------------------- key maps


@pytest.mark.parametrize("in_channels,learn_sigma", VARIANTS)
def test_key_maps_cover_every_tensor_both_ways(in_channels, learn_sigma):
    model = randomize_(tiny_model(in_channels=in_channels, learn_sigma=learn_sigma))
    config = model.config
    tensors = dit_state_dict_to_diffusers(model.state_dict(), config)
    expected = DiTTransformer2DModel(**diffusers_config(config)).state_dict()
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    back = diffusers_state_dict_to_dit(tensors, config)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_fused_qkv_is_split_into_q_k_v_in_order():
    model = randomize_(tiny_model())
    tensors = dit_state_dict_to_diffusers(model.state_dict(), model.config)
    q, k, v = model.blocks[1].attn.qkv.weight.chunk(3)
    assert torch.equal(tensors["transformer_blocks.1.attn1.to_q.weight"], q)
    assert torch.equal(tensors["transformer_blocks.1.attn1.to_k.weight"], k)
    assert torch.equal(tensors["transformer_blocks.1.attn1.to_v.weight"], v)


def test_embedders_are_copied_into_every_block():
    model = randomize_(tiny_model(depth=3))
    converted = dit_to_diffusers(model)
    for block in converted.transformer_blocks:
        emb = block.norm1.emb
        assert torch.equal(emb.timestep_embedder.linear_1.weight, model.t_embedder.mlp[0].weight)
        assert torch.equal(emb.timestep_embedder.linear_2.bias, model.t_embedder.mlp[2].bias)
        assert torch.equal(emb.class_embedder.embedding_table.weight, model.y_embedder.embedding_table.weight)
    # separate tensors (save_pretrained refuses shared ones), not views of the source
    ptrs = {b.norm1.emb.timestep_embedder.linear_1.weight.data_ptr() for b in converted.transformer_blocks}
    assert len(ptrs) == 3 and model.t_embedder.mlp[0].weight.data_ptr() not in ptrs


def test_position_tables_are_the_same_bits():
    model = tiny_model(in_channels=4)
    converted = dit_to_diffusers(model)
    fresh = DiTTransformer2DModel(**diffusers_config(model.config))
    assert torch.equal(converted.pos_embed.pos_embed, fresh.pos_embed.pos_embed)
    assert torch.equal(fresh.pos_embed.pos_embed, model.pos_embed)


# ----------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("in_channels,learn_sigma", VARIANTS)
def test_diffusers_to_leandit_is_exact(in_channels, learn_sigma):
    source = random_diffusers(in_channels, learn_sigma)
    model = diffusers_to_dit(source)
    assert model.config.time_freq_shift == 1.0 and model.config.mlp_norm_eps == 1e-5
    assert model.config.learn_sigma == learn_sigma and model.config.guided_channels is None
    assert max_diff(model, source, model.config) <= EXACT_TOL
    # and back: the diffusers weights survive bit for bit
    again = dit_to_diffusers(model)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in source.state_dict().items())


def test_diffusers_to_leandit_carries_any_norm_eps():
    source = random_diffusers(norm_eps=1e-6)
    model = diffusers_to_dit(source)
    assert model.config.mlp_norm_eps == 1e-6 and model.blocks[0].norm2.eps == 1e-6
    assert max_diff(model, source, model.config) <= EXACT_TOL


@pytest.mark.parametrize("in_channels,learn_sigma", VARIANTS)
def test_original_to_diffusers_differs_only_by_the_time_shift(in_channels, learn_sigma):
    model = dit_like_(tiny_model(in_channels=in_channels, learn_sigma=learn_sigma))
    converted = dit_to_diffusers(model)
    diff = max_diff(model, converted, model.config)
    assert 1e-5 < diff <= SHIFT_TOL  # measured up to 4.92e-4; nonzero: the shift really differs
    # The same weights with diffusers' shift compute exactly what diffusers computes, so the
    # shift is the only difference (eps is carried as norm_eps, the adaLN chunks line up).
    shifted = leandit.models.model_from_state_dict(model.config.replace(time_freq_shift=1.0), model.state_dict())
    assert max_diff(shifted, converted, model.config) <= EXACT_TOL


def test_time_shift_difference_vanishes_at_t_zero():
    model = dit_like_(tiny_model(in_channels=4))
    converted = dit_to_diffusers(model)
    x, _, y = inputs(model.config)
    t = torch.zeros(8, dtype=torch.long)
    with torch.no_grad():
        assert (model(x, t, y) - converted(x, t, y).sample).abs().max().item() <= EXACT_TOL


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("in_channels,learn_sigma", VARIANTS)
def test_round_trip_is_bit_exact_and_restores_the_config(in_channels, learn_sigma):
    tiny = tiny_model(in_channels=in_channels, learn_sigma=learn_sigma, guided_channels=1, objective="flow")
    model = randomize_(leandit.build_model(tiny.config.replace(name="SiT-tiny")))
    converted = dit_to_diffusers(model)
    assert converted.leandit_info["time_freq_shift"] == 0.0 and converted.leandit_info["objective"] == "flow"
    json.dumps(converted.leandit_info)  # plain data, for leandit.json
    back = diffusers_to_dit(converted)
    assert back.config == model.config and back.config.name == "SiT-tiny"
    assert back.config.time_freq_shift == 0.0 and back.config.mlp_norm_eps == 1e-6
    sd = back.state_dict()
    assert sd.keys() == model.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def test_round_trip_through_folders(tmp_path):
    model = randomize_(tiny_model(in_channels=4, space="latent", guided_channels=3))
    model.compression = [{"method": "example", "kept_indices": [0, 1]}]
    leandit.save_model(dit_to_diffusers(model), tmp_path / "d")
    loaded = leandit.load_model(tmp_path / "d")
    assert isinstance(loaded, DiTTransformer2DModel)
    assert loaded.leandit_info["guided_channels"] == 3 and loaded.compression == model.compression
    back = diffusers_to_dit(loaded)
    assert back.config == model.config and back.compression == model.compression
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    exact = diffusers_to_dit(loaded, info={})  # ignore the recorded origin: what diffusers computes
    assert exact.config.time_freq_shift == 1.0 and exact.config.guided_channels is None
    assert max_diff(exact, loaded, exact.config) <= EXACT_TOL


def test_model_without_null_class_gets_a_zero_row_and_loses_it_again():
    model = randomize_(tiny_model(class_dropout_prob=0.0))
    converted = dit_to_diffusers(model)
    table = converted.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight
    assert table.shape[0] == 11 and torch.equal(table[10], torch.zeros(32))
    back = diffusers_to_dit(converted)
    assert not back.config.has_null_class and back.y_embedder.embedding_table.weight.shape[0] == 10
    x, t, y = inputs(model.config)
    y = y % 10
    with torch.no_grad():
        assert torch.equal(back(x, t, y), model(x, t, y))


# ----------------------------------------------------------------------------- refusals


def test_differing_embedder_copies_are_refused_naming_the_block():
    source = random_diffusers()
    with torch.no_grad():
        source.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight[3, 0] += 1e-3
    with pytest.raises(ValueError, match="block 1's time/class embedder differs from block 0's"):
        diffusers_to_dit(source)


def test_mlp_ratio_other_than_4_is_refused():
    with pytest.raises(ValueError, match="fixed MLP ratio of 4"):
        dit_to_diffusers(tiny_model(mlp_ratio=2.0))


def test_non_standard_position_table_is_refused():
    model = tiny_model()
    model.pos_embed.data[0, 3, 5] += 0.01
    with pytest.raises(ValueError, match="pos_embed differs from the fixed sin-cos table"):
        dit_to_diffusers(model)


@pytest.mark.parametrize("override,message", [
    (dict(activation_fn="gelu"), "activation_fn"),
    (dict(dropout=0.1), "dropout"),
    (dict(norm_elementwise_affine=True), "norm_elementwise_affine"),
])
def test_diffusers_variants_leandit_cannot_express_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        diffusers_to_dit(random_diffusers(**override))


def test_mismatched_state_dict_is_named():
    model = tiny_model()
    tensors = dit_state_dict_to_diffusers(model.state_dict(), model.config)
    del tensors["transformer_blocks.1.attn1.to_k.bias"]
    with pytest.raises(CheckpointError, match="missing keys transformer_blocks.1.attn1.to_k.bias"):
        diffusers_state_dict_to_dit(tensors, model.config)
    tensors = dit_state_dict_to_diffusers(model.state_dict(), model.config)
    tensors["proj_out_2.weight"] = tensors["proj_out_2.weight"][:4]
    with pytest.raises(CheckpointError, match="proj_out_2.weight has shape"):
        diffusers_state_dict_to_dit(tensors, model.config)


def test_new_config_fields_are_validated_and_optional_in_old_files():
    old = {k: v for k, v in DiTConfig().to_dict().items() if k not in ("time_freq_shift", "mlp_norm_eps")}
    assert DiTConfig.from_dict(old) == DiTConfig()
    with pytest.raises(ValueError, match="time_freq_shift must be in"):
        DiTConfig(time_freq_shift=2.0)
    with pytest.raises(ValueError, match="mlp_norm_eps must be in"):
        DiTConfig(mlp_norm_eps=0.0)
    with pytest.raises(ValueError, match="mlp_norm_eps must be float"):
        DiTConfig(mlp_norm_eps="1e-6")


# ----------------------------------------------------------------------------- the command


def test_convert_both_ways_as_a_user_runs_it(tmp_path):
    model = dit_like_(tiny_model(in_channels=4, space="latent"))
    torch.save(model.state_dict(), tmp_path / "DiT-tiny.pt")
    done = run_cli("convert", str(tmp_path / "DiT-tiny.pt"), "--to", "diffusers", "--out", str(tmp_path / "d"), "--num-heads", "2")
    assert done.returncode == 0, done.stderr
    assert "max |output diff|" in done.stdout and "guides 3 of 4" in done.stdout
    stock = DiTTransformer2DModel.from_pretrained(tmp_path / "d")  # diffusers alone reads the folder
    expected = dit_state_dict_to_diffusers(model.state_dict(), model.config)
    assert stock.state_dict().keys() == expected.keys()
    assert all(torch.equal(stock.state_dict()[k], v) for k, v in expected.items())
    assert max_diff(model, stock, model.config) <= SHIFT_TOL
    assert json.loads((tmp_path / "d" / "leandit.json").read_text())["backbone"]["guided_channels"] == 3

    done = run_cli("convert", str(tmp_path / "d"), "--to", "leandit", "--out", str(tmp_path / "back"))
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "back" / "config.json").read_text())["info"]["time_shift_restored_from_leandit_json"]
    back = leandit.load_model(tmp_path / "back")
    original = leandit.load_model(tmp_path / "DiT-tiny.pt", num_heads=2)
    assert back.config == original.config and back.config.guided_channels == 3
    assert all(torch.equal(back.state_dict()[k], v) for k, v in original.state_dict().items())


def test_convert_stock_diffusers_folder_to_leandit_is_exact(tmp_path, capsys):
    source = random_diffusers()
    source.save_pretrained(tmp_path / "stock")
    assert main(["convert", str(tmp_path / "stock"), "--to", "leandit", "--out", str(tmp_path / "m")]) == 0
    assert "outputs equal up to float rounding" in capsys.readouterr().out
    model = leandit.load_model(tmp_path / "m")
    assert model.config.time_freq_shift == 1.0 and model.config.mlp_norm_eps == 1e-5
    assert max_diff(model, source, model.config) <= EXACT_TOL


def test_keep_diffusers_shift_builds_what_diffusers_computes(tmp_path, capsys):
    model = dit_like_(tiny_model(in_channels=4, space="latent", guided_channels=3))
    leandit.save_model(model, tmp_path / "m")
    assert main(["convert", str(tmp_path / "m"), "--to", "diffusers", "--out", str(tmp_path / "d")]) == 0
    assert main(["convert", str(tmp_path / "d"), "--to", "leandit", "--out", str(tmp_path / "x"), "--keep-diffusers-shift"]) == 0
    assert "outputs equal up to float rounding" in capsys.readouterr().out
    exact = leandit.load_model(tmp_path / "x")
    assert exact.config.time_freq_shift == 1.0 and exact.config.guided_channels == 3  # the other recorded facts stay
    assert max_diff(exact, dit_to_diffusers(model), model.config) <= EXACT_TOL


def test_convert_checkpoint_file_to_a_leandit_folder(tmp_path, capsys):
    model = randomize_(tiny_model())
    torch.save(model.state_dict(), tmp_path / "DiT-tiny.pt")
    assert main(["convert", str(tmp_path / "DiT-tiny.pt"), "--to", "leandit", "--out", str(tmp_path / "m"), "--num-heads", "2"]) == 0
    loaded = leandit.load_model(tmp_path / "m")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def _fails(args, capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    return err


def test_convert_refusals_are_one_line_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "notdit.pt")
    assert "not a DiT/SiT state dict" in _fails(["convert", str(tmp_path / "notdit.pt"), "--to", "diffusers", "--out", str(out)], capsys)
    assert "not found" in _fails(["convert", str(tmp_path / "missing.pt"), "--to", "diffusers", "--out", str(out)], capsys)

    from diffusers import PixArtTransformer2DModel

    PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
                             cross_attention_dim=16, caption_channels=8, sample_size=8, patch_size=2).save_pretrained(tmp_path / "pixart")
    err = _fails(["convert", str(tmp_path / "pixart"), "--to", "leandit", "--out", str(out)], capsys)
    assert "holds a PixArtTransformer2DModel, not a DiT" in err

    differing = random_diffusers()
    with torch.no_grad():
        differing.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.bias[0] += 1.0
    differing.save_pretrained(tmp_path / "differing")
    assert "block 1's time/class embedder differs" in _fails(["convert", str(tmp_path / "differing"), "--to", "leandit", "--out", str(out)], capsys)

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text(json.dumps(dict(differing.config)))
    assert "diffusion_pytorch_model.safetensors is missing" in _fails(["convert", str(tmp_path / "broken"), "--to", "leandit", "--out", str(out)], capsys)

    assert "already a diffusers DiT" in _fails(["convert", str(tmp_path / "differing"), "--to", "diffusers", "--out", str(out)], capsys)
    leandit.save_model(tiny_model(), tmp_path / "leandit")
    assert "already a leandit model folder" in _fails(["convert", str(tmp_path / "leandit"), "--to", "leandit", "--out", str(out)], capsys)
    assert "fixed MLP ratio" in _fails(["convert", str(_saved(tmp_path, mlp_ratio=2.0)), "--to", "diffusers", "--out", str(out)], capsys)
    assert not out.exists()
    assert "already exists" in _fails(["convert", str(tmp_path / "leandit"), "--to", "diffusers", "--out", str(tmp_path / "pixart")], capsys)


def _saved(tmp_path, **overrides):
    folder = tmp_path / "narrow"
    leandit.save_model(tiny_model(**overrides), folder)
    return folder
