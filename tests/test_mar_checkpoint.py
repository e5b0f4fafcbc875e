"""MAR's release files load, and leandit's MAR computes the released network.

- Numerical equivalence: leandit's MAR against an independent functional re-computation of
  the original forward (`mar_reference.py`) on the same random weights (non-zero everywhere,
  the head's zero-initialised layers too) with fixed orders and masks: the encoder, the
  decoder, the head and the whole training forward, on small configs with patch sizes 1 and
  2 and different encoder and decoder widths.
- The release's tensors, written out by hand from the published facts (not from leandit's
  module), infer MAR-B/L/H; a `checkpoint-last.pth`-like file (model, model_ema, optimizer,
  epoch, scaler, args) loads through `leandit.load_model` with its EMA weights, strictly, with
  one-line errors for damaged files.
"""

from __future__ import annotations

import argparse
import math
import os

import pytest
import torch

import mar_reference as ref
from conftest import run_cli
from leandit.backbones.mar import mar_from_state_dict
from leandit.diffusion.masked import MaskedTokens, patchify
from leandit.models import CheckpointError, build_model, load_model
from leandit.models.infer_mar import infer_mar_config
from leandit.models.mar_config import MARConfig, named_mar_config

TOL = 1e-5

# ------------------------------------------------------------------- numerical equivalence

CONFIGS = {
    # The contract's tiny pixel MAR (digits shape): patch 2, one channel.
    "p2-digits": MARConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, encoder_depth=2, encoder_heads=2,
                           decoder_hidden_size=32, decoder_depth=2, decoder_heads=2, buffer_size=4, num_classes=10,
                           head_depth=2, head_width=32, space="pixel", attn_dropout=0.0, proj_dropout=0.0),
    # Patch 1 as released (a token is one latent pixel), a wider encoder than decoder.
    "p1-wide-encoder": MARConfig(input_size=4, patch_size=1, in_channels=4, hidden_size=48, encoder_depth=2, encoder_heads=3,
                                 decoder_hidden_size=32, decoder_depth=1, decoder_heads=4, mlp_ratio=2.0, buffer_size=3,
                                 num_classes=5, head_depth=3, head_width=40),
    # Patch 2 over 3 channels, a wider decoder, one encoder block, MLP ratio 3.
    "p2-wide-decoder": MARConfig(input_size=8, patch_size=2, in_channels=3, hidden_size=32, encoder_depth=1, encoder_heads=2,
                                 decoder_hidden_size=64, decoder_depth=2, decoder_heads=4, mlp_ratio=3.0, buffer_size=2,
                                 num_classes=7, head_depth=1, head_width=24),
}


def random_mar(config: MARConfig, seed: int = 0):
    model = ref.randomize_parameters_(build_model(config), seed).eval()
    zero_init = [model.diffloss.net.final_layer.linear.weight, model.diffloss.net.final_layer.adaLN_modulation[1].weight,
                 *(b.adaLN_modulation[1].weight for b in model.diffloss.net.res_blocks)]
    assert all(bool((p != 0).all()) for p in zero_init)  # the head's zero-init layers are live
    return model


def batch(config: MARConfig, num_unknown: int, n: int = 3, seed: int = 1):
    """Images, their tokens, orders and MAR's mask, labels (the last one the null class)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, config.in_channels, config.input_size, config.input_size, generator=gen)
    orders = torch.stack([torch.randperm(config.num_tokens, generator=gen) for _ in range(n)])
    mask = ref.mask_from_orders(orders, num_unknown)
    labels = torch.randint(0, config.num_classes, (n,), generator=gen)
    labels[-1] = config.num_classes  # the fake latent
    return images, mask, labels


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_encoder_decoder_and_head_match_the_original(name):
    config = CONFIGS[name]
    model = random_mar(config)
    sd = model.state_dict()
    length, b = config.num_tokens, config.buffer_size
    # Masks: MAR's training draw (70 % unknown, rounded up), the first generation step (all
    # unknown: the encoder sees the buffer only) and the last (one unknown).
    for num_unknown in (math.ceil(0.7 * length), length, 1):
        images, mask, labels = batch(config, num_unknown)
        tokens = patchify(images, config.patch_size)
        assert torch.equal(tokens, ref.patchify(images, config.patch_size))
        with torch.no_grad():
            enc = model.encode(tokens, mask, labels)
            enc_ref = ref.encoder(sd, tokens, mask, labels, buffer_size=b, num_heads=config.encoder_heads)
            assert enc.shape == (3, b + length - num_unknown, config.hidden_size)
            assert max_diff(enc, enc_ref) < TOL, (name, num_unknown)
            dec = model.decode(enc_ref, mask)
            dec_ref = ref.decoder(sd, enc_ref, mask, buffer_size=b, num_heads=config.decoder_heads)
            assert dec.shape == (3, length, config.decoder_hidden_size)
            assert max_diff(dec, dec_ref) < TOL, (name, num_unknown)

    gen = torch.Generator().manual_seed(2)
    m = 7
    z = torch.randn(m, config.decoder_hidden_size, generator=gen)
    x_t = torch.randn(m, config.token_dim, generator=gen)
    t = torch.randint(0, 1000, (m,), generator=gen)
    with torch.no_grad():
        out = model.head(x_t, t, z)
    expected = ref.head(sd, x_t, t, z)
    assert out.shape == (m, 2 * config.token_dim)
    assert expected.abs().mean() > 0.1  # a live head, not a zero output
    assert max_diff(out, expected) < TOL


@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_forward_matches_the_original(name):
    """forward(MaskedTokens, t, labels): every image's head rows at its own unknown tokens,
    each repeated twice (MAR's diffusion_batch_mul) with its own timestep and noisy value."""
    config = CONFIGS[name]
    model = random_mar(config, seed=3)
    images, mask, labels = batch(config, math.ceil(0.7 * config.num_tokens), seed=4)
    tokens = patchify(images, config.patch_size)
    rows = [[j for j in range(config.num_tokens) if mask[i, j]] * 2 for i in range(len(mask))]
    index = torch.tensor(rows)  # (N, M)
    gen = torch.Generator().manual_seed(5)
    noisy = torch.randn(*index.shape, config.token_dim, generator=gen)
    t = torch.randint(0, 1000, index.shape, generator=gen)
    with torch.no_grad():
        out = model(MaskedTokens(tokens, mask, index, noisy), t, labels)
    expected = ref.forward(model.state_dict(), tokens, mask, labels, rows, noisy, t, buffer_size=config.buffer_size,
                           encoder_heads=config.encoder_heads, decoder_heads=config.decoder_heads)
    assert out.shape == (len(mask), index.shape[1], 2 * config.token_dim)
    assert max_diff(out, expected) < TOL


def test_null_label_is_the_fake_latent():
    """The unconditional branch embeds the learned fake latent, not a row of the class table."""
    config = CONFIGS["p1-wide-encoder"]
    model = random_mar(config)
    labels = torch.tensor([0, config.num_classes])
    table = model.class_embedding(labels)
    assert torch.equal(table[0], model.class_emb.weight[0])
    assert torch.equal(table[1], model.fake_latent[0])


# ------------------------------------------------------------------- the release's tensors

# The released sizes (MAR paper and README): width, blocks per encoder/decoder, the
# diffusion-loss MLP's depth and width. All three: 16-dim KL-16 tokens (patch 1), 256 tokens
# (16 x 16 latents of 256 px images), a 64-row buffer, 1000 classes, MLP ratio 4.
RELEASED = {"MAR-B": (768, 12, 6, 1024), "MAR-L": (1024, 16, 8, 1280), "MAR-H": (1280, 20, 12, 1536)}
# Parameter counts of these tables; the README's 208M / 479M / 943M are them rounded up, and
# the release's downloads (1587 / 3650 / 7191 MiB) hold two float32 copies (model, EMA).
RELEASED_PARAMS = {"MAR-B": 207_924_768, "MAR-L": 478_326_304, "MAR-H": 942_403_104}


def release_shapes(width: int, depth: int, head_depth: int, head_width: int, *, tokens: int = 256, buffer: int = 64,
                   token_dim: int = 16, classes: int = 1000, mlp: int = 4) -> dict[str, tuple[int, ...]]:
    """The tensors of MAR's state dict, written from models/mar.py and models/diffloss.py.

    MAR: class_emb (K, D); fake_latent (1, D); z_proj C -> D; z_proj_ln; learned positions
    (1, B + L, D) for encoder and decoder and (1, L, D) for the head; timm Blocks (norm1, qkv
    D -> 3D with bias, proj, norm2, fc1 D -> 4D, fc2); encoder_norm; decoder_embed D -> D;
    mask_token (1, 1, D); decoder_norm. SimpleMLPAdaLN: time_embed.mlp 256 -> W -> W;
    cond_embed D -> W; input_proj C -> W; ResBlocks (in_ln, mlp.0 and mlp.2 W -> W,
    adaLN_modulation.1 W -> 3W); final_layer (linear W -> 2C, adaLN_modulation.1 W -> 2W, its
    LayerNorm without parameters).
    """
    d, w, c = width, head_width, token_dim
    shapes: dict[str, tuple[int, ...]] = {
        "class_emb.weight": (classes, d), "fake_latent": (1, d),
        "z_proj.weight": (d, c), "z_proj.bias": (d,), "z_proj_ln.weight": (d,), "z_proj_ln.bias": (d,),
        "encoder_pos_embed_learned": (1, buffer + tokens, d),
        "encoder_norm.weight": (d,), "encoder_norm.bias": (d,),
        "decoder_embed.weight": (d, d), "decoder_embed.bias": (d,), "mask_token": (1, 1, d),
        "decoder_pos_embed_learned": (1, buffer + tokens, d),
        "decoder_norm.weight": (d,), "decoder_norm.bias": (d,),
        "diffusion_pos_embed_learned": (1, tokens, d),
    }
    for part in ("encoder_blocks", "decoder_blocks"):
        for i in range(depth):
            p = f"{part}.{i}"
            shapes.update({
                f"{p}.norm1.weight": (d,), f"{p}.norm1.bias": (d,),
                f"{p}.attn.qkv.weight": (3 * d, d), f"{p}.attn.qkv.bias": (3 * d,),
                f"{p}.attn.proj.weight": (d, d), f"{p}.attn.proj.bias": (d,),
                f"{p}.norm2.weight": (d,), f"{p}.norm2.bias": (d,),
                f"{p}.mlp.fc1.weight": (mlp * d, d), f"{p}.mlp.fc1.bias": (mlp * d,),
                f"{p}.mlp.fc2.weight": (d, mlp * d), f"{p}.mlp.fc2.bias": (d,),
            })
    h = "diffloss.net"
    shapes.update({
        f"{h}.time_embed.mlp.0.weight": (w, 256), f"{h}.time_embed.mlp.0.bias": (w,),
        f"{h}.time_embed.mlp.2.weight": (w, w), f"{h}.time_embed.mlp.2.bias": (w,),
        f"{h}.cond_embed.weight": (w, d), f"{h}.cond_embed.bias": (w,),
        f"{h}.input_proj.weight": (w, c), f"{h}.input_proj.bias": (w,),
        f"{h}.final_layer.linear.weight": (2 * c, w), f"{h}.final_layer.linear.bias": (2 * c,),
        f"{h}.final_layer.adaLN_modulation.1.weight": (2 * w, w), f"{h}.final_layer.adaLN_modulation.1.bias": (2 * w,),
    })
    for j in range(head_depth):
        p = f"{h}.res_blocks.{j}"
        shapes.update({
            f"{p}.in_ln.weight": (w,), f"{p}.in_ln.bias": (w,),
            f"{p}.mlp.0.weight": (w, w), f"{p}.mlp.0.bias": (w,), f"{p}.mlp.2.weight": (w, w), f"{p}.mlp.2.bias": (w,),
            f"{p}.adaLN_modulation.1.weight": (3 * w, w), f"{p}.adaLN_modulation.1.bias": (3 * w,),
        })
    return shapes


def release_args(**overrides) -> argparse.Namespace:
    """main_mar.py's arguments as a MAR-L training run records them (README's command)."""
    fields = dict(model="mar_large", img_size=256, vae_path="pretrained_models/vae/kl16.ckpt", vae_embed_dim=16,
                  vae_stride=16, patch_size=1, num_iter=64, cfg=1.0, cfg_schedule="linear", label_drop_prob=0.1,
                  diffloss_d=8, diffloss_w=1280, num_sampling_steps="100", diffusion_batch_mul=4, temperature=1.0,
                  class_num=1000, mask_ratio_min=0.7, attn_dropout=0.1, proj_dropout=0.1, buffer_size=64,
                  grad_checkpointing=False, ema_rate=0.9999, output_dir="./output_dir", resume="", device="cuda",
                  epochs=800, batch_size=64, lr=None, blr=8e-4, seed=1, distributed=True, dist_url="env://")
    fields.update(overrides)
    return argparse.Namespace(**fields)


@pytest.mark.parametrize("size", list(RELEASED))
def test_released_sizes_are_inferred(size):
    """torch.empty reserves the tensors without touching them: no time, (almost) no memory."""
    width, depth, head_depth, head_width = RELEASED[size]
    sd = {k: torch.empty(s) for k, s in release_shapes(width, depth, head_depth, head_width).items()}
    assert sum(t.numel() for t in sd.values()) == RELEASED_PARAMS[size]
    config = infer_mar_config(sd)
    assert config.name == size
    assert config == named_mar_config(size)
    assert (config.patch_size, config.in_channels, config.input_size, config.num_tokens) == (1, 16, 16, 256)
    assert config.buffer_size == 64 and config.num_classes == 1000 and config.mlp_ratio == 4.0
    assert (config.head_depth, config.head_width) == (head_depth, head_width)
    assert config.space == "latent" and config.latent_scale == 0.2325
    if size == "MAR-L":
        model = mar_from_state_dict(config, sd)
        loaded = model.state_dict()
        assert set(loaded) == set(sd)
        assert all(loaded[k].data_ptr() == sd[k].data_ptr() for k in sd)  # adopted, not copied


def test_args_set_the_token_layout_and_training_settings():
    """A patch-2 MAR over 4 channels: 16 values a token could also be 16 channels of patch 1;
    `args` tells which, and the training settings come with it."""
    sd = {k: torch.empty(s) for k, s in release_shapes(1024, 1, 1, 64, tokens=64, buffer=8, token_dim=16).items()}
    args = release_args(patch_size=2, vae_embed_dim=4, img_size=256, vae_stride=16, buffer_size=8, diffloss_d=1,
                        diffloss_w=64, mask_ratio_min=0.5, label_drop_prob=0.2, diffusion_batch_mul=2,
                        num_sampling_steps="250", attn_dropout=0.0, proj_dropout=0.05)
    config = infer_mar_config(sd, args=args, name="checkpoint-last")
    assert (config.patch_size, config.in_channels, config.input_size, config.seq_side) == (2, 4, 16, 8)
    assert (config.mask_ratio_min, config.class_dropout_prob, config.head_batch_mul) == (0.5, 0.2, 2)
    assert (config.head_sampling_steps, config.attn_dropout, config.proj_dropout) == (250, 0.0, 0.05)
    assert config.name == "checkpoint-last"  # not a released size
    plain = infer_mar_config(sd)  # no args: MAR's defaults
    assert (plain.patch_size, plain.in_channels, plain.input_size) == (1, 16, 8)
    assert plain.head_sampling_steps == 100 and plain.mask_ratio_min == 0.7
    # A training setting leandit cannot use (a respacing string, more steps than the head's
    # 1000, an impossible mask ratio) keeps the default instead of refusing the weights.
    odd = infer_mar_config(sd, args=release_args(num_sampling_steps="ddim25", mask_ratio_min=0.0, img_size=128,
                                                 buffer_size=8, diffloss_d=1, diffloss_w=64))
    assert (odd.head_sampling_steps, odd.mask_ratio_min) == (100, 0.7)
    assert infer_mar_config(sd, args=release_args(num_sampling_steps="5000", img_size=128, buffer_size=8, diffloss_d=1,
                                                  diffloss_w=64)).head_sampling_steps == 100
    with pytest.raises(CheckpointError, match="args say img_size=512, vae_stride=16"):
        infer_mar_config(sd, args=release_args(img_size=512, buffer_size=8, diffloss_d=1, diffloss_w=64))
    with pytest.raises(CheckpointError, match="args say diffloss_w=1280, its tensors head_width=64"):
        infer_mar_config(sd, args=release_args(img_size=128, buffer_size=8, diffloss_d=1))


def test_non_released_width_needs_the_head_count():
    sd = {k: torch.empty(s) for k, s in release_shapes(96, 1, 1, 32, tokens=16, buffer=4, classes=3).items()}
    with pytest.raises(CheckpointError, match="encoder width 96 is not a released MAR width.*--num-heads"):
        infer_mar_config(sd)
    config = infer_mar_config(sd, num_heads=6)
    assert config.encoder_heads == config.decoder_heads == 6


# ------------------------------------------------------------------- release files


def expanded(shapes: dict, value: float) -> dict[str, torch.Tensor]:
    """Tensors of the given shapes that all view one stored number (stride 0): torch.save
    writes each as one value, so a MAR-L-shaped file stays a few hundred kB."""
    return {k: torch.full((), value).expand(s) for k, s in shapes.items()}


def optimizer_state(params: list[torch.Tensor]) -> dict:
    """An AdamW state dict as main_mar.py saves it (betas 0.9/0.95, weight decay groups)."""
    opt = torch.optim.AdamW([{"params": params[:2], "weight_decay": 0.0}, {"params": params[2:], "weight_decay": 0.02}],
                            lr=8e-4, betas=(0.9, 0.95))
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return opt.state_dict()


def release_checkpoint(model_sd: dict, ema_sd: dict | None, args=None) -> dict:
    params = [torch.zeros(3, requires_grad=True) for _ in range(4)]
    return {"model": model_sd, "model_ema": ema_sd, "optimizer": optimizer_state(params), "epoch": 799,
            "scaler": torch.amp.GradScaler("cpu").state_dict(), "args": args if args is not None else release_args()}


@pytest.fixture(scope="module")
def mar_l_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("release") / "checkpoint-last.pth"
    shapes = release_shapes(*RELEASED["MAR-L"])
    torch.save(release_checkpoint(expanded(shapes, 0.0), expanded(shapes, 1.0)), path)
    return path


def test_mar_l_release_file_loads_with_its_ema(mar_l_file):
    assert os.path.getsize(mar_l_file) < 2_000_000
    model = load_model(mar_l_file)  # torch's safe loader: the args Namespace, AdamW state, scaler
    assert model.config == named_mar_config("MAR-L") and model.config.name == "MAR-L"
    assert sum(p.numel() for p in model.parameters()) == RELEASED_PARAMS["MAR-L"]
    assert model.source == str(mar_l_file)
    assert model.compression == []  # a release file has no compression history
    assert model.z_proj.weight[0, 0].item() == 1.0 and model.diffloss.net.input_proj.bias[0].item() == 1.0  # EMA
    assert load_model(mar_l_file, weights="ema").z_proj.weight[0, 0].item() == 1.0
    assert load_model(mar_l_file, weights="model").z_proj.weight[0, 0].item() == 0.0


def small_release(tmp_path, *, ema: bool = True, args=None, name: str = "checkpoint-last.pth", mutate=None):
    """A narrow MAR with the release's layout (patch 1, 16 channels, 16 tokens) and random
    weights, saved as main_mar.py saves it; returns (path, model weights, EMA weights)."""
    config = MARConfig(input_size=4, in_channels=16, hidden_size=64, encoder_depth=2, encoder_heads=4,
                       decoder_hidden_size=64, decoder_depth=2, decoder_heads=4, buffer_size=4, num_classes=10,
                       head_depth=2, head_width=48)
    model_sd = ref.randomize_parameters_(build_model(config), 0).state_dict()
    ema_sd = ref.randomize_parameters_(build_model(config), 1).state_dict()
    if mutate is not None:
        mutate(ema_sd)
    args = args if args is not None else release_args(model="mar_small", buffer_size=4, class_num=10, diffloss_d=2,
                                                      diffloss_w=48, img_size=64)
    path = tmp_path / name
    torch.save(release_checkpoint(model_sd, ema_sd if ema else None, args), path)
    return path, model_sd, ema_sd


def test_small_release_file_computes_the_original_on_its_ema(tmp_path):
    path, model_sd, ema_sd = small_release(tmp_path)
    model = load_model(path, num_heads=4).eval()
    c = model.config
    assert (c.hidden_size, c.encoder_depth, c.decoder_depth, c.buffer_size, c.num_tokens) == (64, 2, 2, 4, 16)
    assert c.name == "checkpoint-last" and c.space == "latent"
    images, mask, labels = batch(c, 11, seed=7)
    tokens = patchify(images, 1)
    with torch.no_grad():
        z = model.context(tokens, mask, labels)
    enc = ref.encoder(ema_sd, tokens, mask, labels, buffer_size=4, num_heads=4)
    expected = ref.decoder(ema_sd, enc, mask, buffer_size=4, num_heads=4)
    assert max_diff(z, expected) < TOL
    chosen = load_model(path, num_heads=4, weights="model").state_dict()
    assert all(torch.equal(chosen[k], model_sd[k]) for k in model_sd)


def test_training_without_ema_uses_the_model(tmp_path):
    path, model_sd, _ = small_release(tmp_path, ema=False)  # main_mar.py writes model_ema=None then
    loaded = load_model(path, num_heads=4).state_dict()
    assert all(torch.equal(loaded[k], model_sd[k]) for k in model_sd)
    with pytest.raises(CheckpointError, match="has no EMA weights.*--weights model"):
        load_model(path, num_heads=4, weights="ema")


def test_plain_and_prefixed_state_dicts_load(tmp_path):
    path, _, ema_sd = small_release(tmp_path)
    torch.save({f"module.{k}": v for k, v in ema_sd.items()}, tmp_path / "mar.pth")
    loaded = load_model(tmp_path / "mar.pth", num_heads=4).state_dict()
    assert all(torch.equal(loaded[k], ema_sd[k]) for k in ema_sd)


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path):
    def drop(sd):
        del sd["decoder_blocks.1.mlp.fc2.bias"]

    def add(sd):
        sd["diffloss.net.extra.weight"] = torch.zeros(2)

    def reshape(sd):
        sd["mask_token"] = torch.zeros(1, 2, 64)

    for mutate, message in ((drop, r"missing keys decoder_blocks\.1\.mlp\.fc2\.bias"),
                            (add, r"unexpected keys diffloss\.net\.extra\.weight"),
                            (reshape, r"mask_token has shape \(1, 2, 64\), the model expects \(1, 1, 64\)")):
        path, _, _ = small_release(tmp_path, mutate=mutate)
        with pytest.raises(CheckpointError, match=message) as err:
            load_model(path, num_heads=4)
        assert "checkpoint-last.pth (model_ema)" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("damage", ["truncated", "empty", "text"])
def test_damaged_release_file_is_one_line(tmp_path, mar_l_file, damage):
    path = tmp_path / "checkpoint-last.pth"
    data = mar_l_file.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "text": b"MAR-L weights\n"}[damage])
    with pytest.raises(CheckpointError, match="checkpoint-last.pth: not a readable PyTorch checkpoint") as err:
        load_model(path)
    assert "\n" not in str(err.value)


def test_objective_flag_does_not_apply(tmp_path):
    path, _, _ = small_release(tmp_path)
    with pytest.raises(CheckpointError, match="is a MAR checkpoint.*--objective flow applies to DiT/SiT files only"):
        load_model(path, num_heads=4, objective="flow")


def test_cli_errors_on_a_damaged_release_file(tmp_path, mar_l_file):
    path = tmp_path / "checkpoint-last.pth"
    path.write_bytes(mar_l_file.read_bytes()[:5000])
    result = run_cli("info", str(path))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "checkpoint-last.pth: not a readable PyTorch checkpoint" in lines[0], result.stderr


def test_info_prints_a_release_file(mar_l_file):
    result = run_cli("info", str(mar_l_file))
    assert result.returncode == 0, result.stderr
    assert "MAR" in result.stdout and "478,326,304" in result.stdout
