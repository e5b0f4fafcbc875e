"""Latents -> images: the decode every DiT/SiT sample and every Inception FID goes through,
checked against decoding by hand with a tiny random AutoencoderKL, through `to_uint8_images`,
through `leandit sample --vae`, and as the round trip extract-features -> latents -> images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import leandit
from leandit.cli import main
from leandit.data.features import extract_features
from leandit.data.latents import LatentShardDataset
from leandit.evaluate.sampling import generate, make_labels, to_uint8_images

from conftest import randomize_, tiny_model

SD_SCALE = 0.18215  # written out here on purpose: the SD-VAE latent scale of the DiT paper, not leandit's constant
RES = 16  # images; two VAE blocks halve it once: 8 x 8 x 4 latents


def _vae(logvar_bias: float = 0.0):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=RES)
    with torch.no_grad():
        # Spread the random decoder's output over [-1, 1] so that uint8 images tell latents apart.
        vae.decoder.conv_out.weight.mul_(8)
        vae.quant_conv.bias[4:].fill_(logvar_bias)  # the posterior's log-variance channels
    return vae.eval()


@pytest.fixture(scope="module")
def vae():
    return _vae()


def _images(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, RES, RES, generator=gen) * 2 - 1


@torch.no_grad()
def _by_hand(vae, latents: torch.Tensor) -> np.ndarray:
    """The DiT sample.py decode: vae.decode(z / 0.18215), then [-1, 1] -> 0..255, NHWC."""
    x = vae.decode(latents / SD_SCALE).sample
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def test_decoding_divides_by_the_latent_scale(vae):
    z = vae.encode(_images(4)).latent_dist.mean * SD_SCALE  # what a latent DiT is trained to generate
    expected = _by_hand(vae, z)
    assert np.array_equal(to_uint8_images(z, "latent", vae), expected)
    assert np.array_equal(to_uint8_images(z, "latent", vae, batch_size=3), expected)  # batching changes nothing
    # The check can tell the scale apart: multiplying by it gives other images.
    wrong = _by_hand(vae, z * SD_SCALE * SD_SCALE)
    assert np.abs(wrong.astype(int) - expected.astype(int)).mean() > 5
    assert expected.std() > 20  # the images use the range, not one grey
    with pytest.raises(ValueError, match="pass the VAE"):
        to_uint8_images(z, "latent")


def test_leandit_sample_decodes_a_latent_model_as_by_hand(vae, tmp_path):
    vae_dir, model_dir = tmp_path / "vae", tmp_path / "model"
    vae.save_pretrained(vae_dir)
    model = randomize_(tiny_model(depth=1, in_channels=4, input_size=RES // 2, space="latent"), std=0.1)
    leandit.save_model(model, model_dir)
    out = tmp_path / "s"
    assert main(["sample", str(model_dir), "--vae", str(vae_dir), "--num-samples", "3", "--sampler", "ddim", "--steps", "3",
                 "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    with np.load(out / "samples.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (3, RES, RES, 3) and images.dtype == np.uint8
    latents = generate(leandit.load_model(model_dir), torch.as_tensor(labels), sampler="ddim", steps=3, seed=0, progress=False)
    assert np.array_equal(labels, make_labels(3, 10).numpy())
    np.testing.assert_array_equal(images, _by_hand(vae, latents))


def test_extracted_latents_decode_back_to_the_images_the_vae_reconstructs(tmp_path):
    # A near-deterministic posterior (std ~ 1e-7): the stored latent is the scaled mean.
    vae = _vae(logvar_bias=-30.0)
    vae.save_pretrained(tmp_path / "vae")
    images = ((_images(6, seed=1) + 1) * 127.5).round().to(torch.uint8)  # (N, 3, H, W)
    for i, image in enumerate(images):
        folder = tmp_path / "images" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    extract_features(tmp_path / "images", tmp_path / "vae", tmp_path / "latents", resolution=RES, shard_size=4, flip=False,
                     dtype="float32", device="cpu", progress=False)
    data = LatentShardDataset(tmp_path / "latents")
    assert data.scale_factor == pytest.approx(SD_SCALE)
    latents = torch.stack([data[k][0] for k in range(len(data))])
    # Item k is the k-th file in class order: class0/0,2,4 then class1/1,3,5.
    order = [0, 2, 4, 1, 3, 5]
    with torch.no_grad():
        x = images[order].float() / 127.5 - 1
        reconstructed = vae.decode(vae.encode(x).latent_dist.mean).sample
    expected = ((reconstructed.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    decoded = to_uint8_images(latents, "latent", vae)
    assert np.abs(decoded.astype(int) - expected.astype(int)).max() <= 1  # float rounding only
