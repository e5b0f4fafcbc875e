"""MAR's KL-16 VAE (an LDM checkpoint file, `kl16.ckpt`) loads as a diffusers AutoencoderKL.

The LDM key names and shapes are written here from the facts of LDM's autoencoder (as MAR's
models/vae.py builds it), not taken from diffusers; a small hand-written functional LDM
forward on the same tensors checks that the converted diffusers VAE computes the LDM
network (encoder, posterior moments, decoder), and the full KL-16 shape table checks that
the released architecture converts key for key.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from conftest import run_cli
from leandit.data.vae import (
    KL16_LATENT_SCALE,
    convert_ldm_vae,
    ldm_vae_config,
    load_vae,
    read_vae_config,
    vae_fingerprint,
)
from leandit.models import CheckpointError

GROUPS = 32  # LDM's GroupNorm groups
EPS = 1e-6
TOL = 1e-5

# ----------------------------------------------------------------------------- LDM's tensors


def ldm_shapes(*, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int, in_channels: int = 3,
               out_channels: int = 3, encoder_attn: tuple[int, ...] = (), decoder_attn: tuple[int, ...] = ()) -> dict:
    """The tensors of LDM's AutoencoderKL (double_z, embed_dim = z_channels), by name.

    Encoder: conv_in; level i has num_res_blocks ResnetBlocks from ch*in_mult[i] to
    ch*ch_mult[i] (a 1x1 nin_shortcut when the width changes), an AttnBlock after each of them
    at the attending levels, a stride-2 downsample conv except at the last level; the middle
    block_1, attn_1, block_2; norm_out; conv_out to 2 z channels (mean and log-variance).
    quant_conv 2z -> 2z and post_quant_conv z -> z (1x1). Decoder: conv_in from z to the last
    width, the middle, then the levels from the last to the first with num_res_blocks + 1
    blocks each and a nearest-x2 upsample conv except at level 0; norm_out; conv_out.
    """
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, out, inp, k):
        shapes[f"{name}.weight"] = (out, inp, k, k)
        shapes[f"{name}.bias"] = (out,)

    def norm(name, c):
        shapes[f"{name}.weight"] = (c,)
        shapes[f"{name}.bias"] = (c,)

    def resnet(name, inp, out):
        norm(f"{name}.norm1", inp)
        conv(f"{name}.conv1", out, inp, 3)
        norm(f"{name}.norm2", out)
        conv(f"{name}.conv2", out, out, 3)
        if inp != out:
            conv(f"{name}.nin_shortcut", out, inp, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    levels = len(ch_mult)
    conv("encoder.conv_in", ch, in_channels, 3)
    width = ch
    for i, mult in enumerate(ch_mult):
        for j in range(num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", width, ch * mult)
            width = ch * mult
            if i in encoder_attn:
                attn(f"encoder.down.{i}.attn.{j}", width)
        if i != levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", width, width, 3)
    resnet("encoder.mid.block_1", width, width)
    attn("encoder.mid.attn_1", width)
    resnet("encoder.mid.block_2", width, width)
    norm("encoder.norm_out", width)
    conv("encoder.conv_out", 2 * z_channels, width, 3)
    conv("quant_conv", 2 * z_channels, 2 * z_channels, 1)
    conv("post_quant_conv", z_channels, z_channels, 1)
    width = ch * ch_mult[-1]
    conv("decoder.conv_in", width, z_channels, 3)
    resnet("decoder.mid.block_1", width, width)
    attn("decoder.mid.attn_1", width)
    resnet("decoder.mid.block_2", width, width)
    for i in reversed(range(levels)):
        for j in range(num_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", width, ch * ch_mult[i])
            width = ch * ch_mult[i]
            if i in decoder_attn:
                attn(f"decoder.up.{i}.attn.{j}", width)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", width, width, 3)
    norm("decoder.norm_out", width)
    conv("decoder.conv_out", out_channels, width, 3)
    return shapes


def random_ldm(shapes: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors: convolutions N(0, 1/fan_in), norm weights around 1, biases N(0, 0.1^2)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in shapes.items():
        if len(shape) == 4:
            sd[name] = torch.randn(shape, generator=gen) / math.sqrt(shape[1] * shape[2] * shape[3])
        elif "norm" in name and name.endswith("weight"):
            sd[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            sd[name] = 0.1 * torch.randn(shape, generator=gen)
    return sd


# The released KL-16 (MAR's models/vae.py): ch 128, ch_mult (1, 1, 2, 2, 4), 2 res blocks,
# 16 latent channels, attention at resolution 16 of 256, i.e. the encoder's last level only
# (the decoder is built with no attention resolutions).
KL16 = dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=16, encoder_attn=(4,))
KL16_PARAMS = 66_456_019  # 253.5 MiB in float32: the release's download is 254 MiB
TINY = dict(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, z_channels=16, encoder_attn=(2,))
TINY_DECODER_ATTN = dict(ch=32, ch_mult=(1, 2), num_res_blocks=2, z_channels=4, encoder_attn=(1,), decoder_attn=(0, 1))


# --------------------------------------------------------------------- LDM's forward, by hand


def group_norm(x: torch.Tensor, sd, name: str) -> torch.Tensor:
    n, c, h, w = x.shape
    g = x.reshape(n, GROUPS, -1)
    mean = g.mean(dim=-1, keepdim=True)
    var = ((g - mean) ** 2).mean(dim=-1, keepdim=True)
    y = ((g - mean) / torch.sqrt(var + EPS)).reshape(n, c, h, w)
    return y * sd[f"{name}.weight"][None, :, None, None] + sd[f"{name}.bias"][None, :, None, None]


def swish(x):
    return x * torch.sigmoid(x)


def conv(sd, name, x, stride=1, padding=None):
    w = sd[f"{name}.weight"]
    return F.conv2d(x, w, sd[f"{name}.bias"], stride=stride, padding=w.shape[-1] // 2 if padding is None else padding)


def resnet(sd, name, x):
    h = conv(sd, f"{name}.conv1", swish(group_norm(x, sd, f"{name}.norm1")))
    h = conv(sd, f"{name}.conv2", swish(group_norm(h, sd, f"{name}.norm2")))
    if f"{name}.nin_shortcut.weight" in sd:
        x = conv(sd, f"{name}.nin_shortcut", x)
    return x + h


def attention(sd, name, x):
    """Single-head attention over the pixels, the 1x1 convs as matrices: softmax(q^T k / sqrt(c))."""
    n, c, h, w = x.shape
    y = group_norm(x, sd, f"{name}.norm")
    q, k, v = (conv(sd, f"{name}.{p}", y).reshape(n, c, h * w) for p in ("q", "k", "v"))
    weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c), dim=-1)  # (N, HW_q, HW_k)
    out = (v @ weights.transpose(1, 2)).reshape(n, c, h, w)
    return x + conv(sd, f"{name}.proj_out", out)


def ldm_encode(sd, x, levels: int, blocks: int) -> torch.Tensor:
    """Images (N, 3, H, W) -> moments (N, 2z, H/f, W/f): mean then log-variance."""
    h = conv(sd, "encoder.conv_in", x)
    for i in range(levels):
        for j in range(blocks):
            h = resnet(sd, f"encoder.down.{i}.block.{j}", h)
            if f"encoder.down.{i}.attn.{j}.q.weight" in sd:
                h = attention(sd, f"encoder.down.{i}.attn.{j}", h)
        if i != levels - 1:  # LDM pads right and bottom by one, then a stride-2 conv without padding
            h = conv(sd, f"encoder.down.{i}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2, padding=0)
    h = resnet(sd, "encoder.mid.block_2", attention(sd, "encoder.mid.attn_1", resnet(sd, "encoder.mid.block_1", h)))
    h = conv(sd, "encoder.conv_out", swish(group_norm(h, sd, "encoder.norm_out")))
    return conv(sd, "quant_conv", h)


def ldm_decode(sd, z, levels: int, blocks: int) -> torch.Tensor:
    h = conv(sd, "decoder.conv_in", conv(sd, "post_quant_conv", z))
    h = resnet(sd, "decoder.mid.block_2", attention(sd, "decoder.mid.attn_1", resnet(sd, "decoder.mid.block_1", h)))
    for i in reversed(range(levels)):
        for j in range(blocks + 1):
            h = resnet(sd, f"decoder.up.{i}.block.{j}", h)
            if f"decoder.up.{i}.attn.{j}.q.weight" in sd:
                h = attention(sd, f"decoder.up.{i}.attn.{j}", h)
        if i != 0:
            h = conv(sd, f"decoder.up.{i}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"))
    return conv(sd, "decoder.conv_out", swish(group_norm(h, sd, "decoder.norm_out")))


# --------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def tiny_sd():
    return random_ldm(ldm_shapes(**TINY), seed=0)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory, tiny_sd):
    """A kl16.ckpt-like file: the state dict under "model", as MAR's VAE loader reads it."""
    path = tmp_path_factory.mktemp("vae") / "kl16.ckpt"
    torch.save({"model": tiny_sd}, path)
    return path


def test_kl16_architecture_converts_key_for_key():
    """The released KL-16's tensors (shapes only: no memory is touched) infer MAR's VAE as a
    diffusers config, and every converted key and shape is the diffusers model's."""
    from diffusers import AutoencoderKL

    from leandit.models.infer import check_keys

    sd = {k: torch.empty(s) for k, s in ldm_shapes(**KL16).items()}
    assert sum(t.numel() for t in sd.values()) == KL16_PARAMS
    config = ldm_vae_config(sd)
    assert config["block_out_channels"] == [128, 128, 256, 256, 512]
    assert config["layers_per_block"] == 2
    assert config["latent_channels"] == 16
    assert config["down_block_types"] == ["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D"]
    assert config["up_block_types"] == ["UpDecoderBlock2D"] * 5
    assert config["scaling_factor"] == KL16_LATENT_SCALE == 0.2325
    assert config["in_channels"] == config["out_channels"] == 3
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    assert sum(p.numel() for p in vae.parameters()) == KL16_PARAMS
    check_keys(vae.state_dict(), convert_ldm_vae(sd, config), "KL-16")


@pytest.mark.parametrize("layout", [TINY, TINY_DECODER_ATTN], ids=["kl16-like", "decoder-attention"])
def test_converted_vae_computes_the_ldm_network(tmp_path, layout):
    levels, blocks = len(layout["ch_mult"]), layout["num_res_blocks"]
    sd = random_ldm(ldm_shapes(**layout), seed=1)
    path = tmp_path / "vae.ckpt"
    torch.save({"model": sd}, path)
    vae = load_vae(path)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        moments = ldm_encode(sd, x, levels, blocks)
        z = layout["z_channels"]
        side = 16 // 2 ** (levels - 1)
        assert moments.shape == (2, 2 * z, side, side)
        assert (dist.mean - moments[:, :z]).abs().max().item() < TOL
        assert (dist.logvar - moments[:, z:].clamp(-30.0, 20.0)).abs().max().item() < TOL
        latents = torch.randn(2, z, side, side)
        decoded = vae.decode(latents).sample
        expected = ldm_decode(sd, latents, levels, blocks)
    assert decoded.shape == (2, 3, 16, 16)
    assert (decoded - expected).abs().max().item() < TOL


def test_tiny_kl16_file_loads_decodes_and_scales(tiny_file):
    vae = load_vae(tiny_file)
    assert not vae.training
    assert vae.config.scaling_factor == 0.2325  # MAR's scale for its 16 latent channels
    assert vae.config.latent_channels == 16 and list(vae.config.block_out_channels) == [32, 32, 64]
    with torch.no_grad():
        out = vae.decode(torch.randn(1, 16, 2, 2)).sample
    assert out.shape == (1, 3, 8, 8)
    config = read_vae_config(tiny_file)
    assert config["latent_channels"] == 16 and len(config["block_out_channels"]) == 3
    # The same bytes, the same fingerprint; another file, another one.
    assert vae_fingerprint(tiny_file) == vae_fingerprint(tiny_file)


def test_other_layouts_of_the_file(tmp_path, tiny_sd):
    """A plain state dict, LDM's training checkpoint ("state_dict" with its loss tensors) and a
    VAE inside a whole LDM checkpoint (first_stage_model.*) give the same VAE."""
    x = torch.randn(1, 3, 8, 8)
    reference = None
    variants = {
        "plain.ckpt": tiny_sd,
        "lightning.ckpt": {"state_dict": {**tiny_sd, "loss.discriminator.main.0.weight": torch.zeros(4, 3, 4, 4),
                                          "loss.logvar": torch.zeros(())}, "epoch": 3, "global_step": 1000},
        "ldm.ckpt": {"state_dict": {**{f"first_stage_model.{k}": v for k, v in tiny_sd.items()},
                                    "model.diffusion_model.out.2.weight": torch.zeros(4, 4, 3, 3)}},
    }
    for name, obj in variants.items():
        torch.save(obj, tmp_path / name)
    save_file(dict(tiny_sd), str(tmp_path / "vae.safetensors"))
    for name in [*variants, "vae.safetensors"]:
        with torch.no_grad():
            moments = load_vae(tmp_path / name).encode(x).latent_dist.mean
        if reference is None:
            reference = moments
        assert torch.equal(moments, reference), name


def test_missing_file_names_it(tmp_path):
    missing = tmp_path / "kl16.ckpt"
    with pytest.raises(FileNotFoundError, match="kl16.ckpt") as err:
        load_vae(missing)
    assert "\n" not in str(err.value)


def test_a_mar_checkpoint_is_not_a_vae(tmp_path):
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": {"class_emb.weight": torch.zeros(2, 4), "z_proj.weight": torch.zeros(4, 16)}, "epoch": 1}, path)
    with pytest.raises(CheckpointError, match="checkpoint-last.pth: not a VAE checkpoint.*class_emb.weight") as err:
        load_vae(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("damage", ["truncated", "empty", "text"])
def test_damaged_file_is_one_line(tmp_path, tiny_file, damage):
    path = tmp_path / "kl16.ckpt"
    data = tiny_file.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "text": b"not a checkpoint\n"}[damage])
    with pytest.raises(CheckpointError, match="kl16.ckpt: not a readable PyTorch checkpoint") as err:
        load_vae(path)
    assert "\n" not in str(err.value)


def test_missing_and_misshaped_tensors_are_named(tmp_path, tiny_sd):
    sd = dict(tiny_sd)
    del sd["decoder.up.1.block.0.conv2.bias"]
    torch.save({"model": sd}, tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match=r"missing keys decoder\.up_blocks\.1\.resnets\.0\.conv2\.bias"):
        load_vae(tmp_path / "missing.ckpt")
    sd = dict(tiny_sd)
    sd["encoder.mid.attn_1.q.weight"] = torch.zeros(64, 32, 1, 1)
    torch.save({"model": sd}, tmp_path / "shape.ckpt")
    with pytest.raises(CheckpointError, match=r"encoder\.mid_block\.attentions\.0\.to_q\.weight has shape \(64, 32\)"):
        load_vae(tmp_path / "shape.ckpt")
    sd = {**tiny_sd, "ema.decay": torch.zeros(())}
    torch.save({"model": sd}, tmp_path / "extra.ckpt")
    with pytest.raises(CheckpointError, match="unexpected keys in a KL VAE checkpoint: ema.decay"):
        load_vae(tmp_path / "extra.ckpt")


def test_extract_features_cli_takes_the_file(tmp_path, tiny_file):
    """`leandit extract-features ROOT --vae kl16.ckpt` as a user runs it: 16-channel latents at
    1/4 of the resolution (this tiny VAE has 3 levels)."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    out = tmp_path / "latents"
    result = run_cli("extract-features", str(root), "--vae", str(tiny_file), "--out", str(out), "--resolution", "16",
                     "--device", "cpu", "--quiet", "--no-flip", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "index.json").read_text())
    assert meta["latent_shape"] == [16, 4, 4]
    assert meta["num_images"] == 4
    missing = run_cli("extract-features", str(root), "--vae", str(tmp_path / "nowhere.ckpt"), "--out", str(tmp_path / "x"),
                      "--resolution", "16", "--device", "cpu", "--quiet")
    assert missing.returncode != 0
    lines = [line for line in missing.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "nowhere.ckpt" in lines[0], missing.stderr


def test_extracted_kl16_latents_carry_mars_scale(tmp_path, tiny_file):
    from leandit.data.features import extract_features

    root = tmp_path / "images"
    (root / "cat").mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(root / "cat" / "0.png")
    extract_features(root, tiny_file, tmp_path / "out", resolution=16, flip=False, dtype="float32", device="cpu",
                     progress=False)
    assert json.loads((tmp_path / "out" / "index.json").read_text())["scale_factor"] == 0.2325
