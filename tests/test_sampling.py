"""Sampling: seeded per image, labels, guidance wiring, ADM .npz layout, grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from leandit.evaluate.sampling import generate, make_labels, model_fn_for, save_grid, save_npz, to_uint8_images

from conftest import randomize_, tiny_model


def model():
    m = randomize_(tiny_model(), std=0.1)
    return m.eval()


def test_image_i_is_the_same_whatever_the_batch_size():
    m = model()
    labels = make_labels(7, 10)
    a = generate(m, labels, steps=5, seed=4, batch_size=7, progress=False)
    b = generate(m, labels, steps=5, seed=4, batch_size=3, progress=False)
    assert torch.allclose(a, b, atol=1e-6)
    c = generate(m, labels[3:], steps=5, seed=4, indices=range(3, 7), batch_size=2, progress=False)
    assert torch.allclose(a[3:], c, atol=1e-6)  # the images 3..6 of a larger run
    d = generate(m, labels, steps=5, seed=5, batch_size=7, progress=False)
    assert not torch.allclose(a, d)


def test_pixel_samples_are_clipped_and_ddpm_runs():
    m = model()
    x = generate(m, make_labels(4, 10), sampler="ddpm", steps=10, progress=False)
    assert x.shape == (4, 1, 8, 8) and x.min() >= -1 and x.max() <= 1


def test_guided_model_fn_combines_the_two_halves():
    m = model()
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([5, 50, 500]), torch.tensor([1, 2, 3])
    null = torch.full_like(y, 10)
    cond, uncond = m(x, t, y), m(x, t, null)
    guided = model_fn_for(m, y, cfg_scale=3.0)(x, t)
    assert torch.allclose(guided[:, :1], uncond[:, :1] + 3.0 * (cond[:, :1] - uncond[:, :1]), atol=1e-5)
    assert torch.allclose(guided[:, 1:], cond[:, 1:], atol=1e-6)  # variance channels from the conditional half
    assert torch.equal(model_fn_for(m, y, 1.0)(x, t), cond)


def test_wrong_sampler_and_guidance_without_null_class_are_clear_errors():
    m = model()
    with pytest.raises(ValueError, match="does not fit a diffusion model"):
        generate(m, make_labels(2, 10), sampler="heun", progress=False)
    no_null = tiny_model(class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="null class"):
        generate(no_null, make_labels(2, 10), cfg_scale=2.0, progress=False)


def test_labels():
    assert make_labels(12, 5).tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    assert make_labels(5, 10, "3,7").tolist() == [3, 7, 3, 7, 3]
    r = make_labels(1000, 10, "random", seed=1)
    assert torch.equal(r, make_labels(1000, 10, "random", seed=1)) and set(r.tolist()) == set(range(10))
    with pytest.raises(ValueError, match="class ids"):
        make_labels(3, 10, "11")
    with pytest.raises(ValueError, match="balanced"):
        make_labels(3, 10, "sometimes")


def test_uint8_conversion_npz_layout_and_grid(tmp_path):
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 2, 2)
    images = to_uint8_images(x, "pixel")
    assert images.shape == (1, 2, 2, 1) and images.dtype == np.uint8
    assert images.reshape(-1).tolist() == [0, 128, 255, 255]
    with pytest.raises(ValueError, match="--vae"):
        to_uint8_images(torch.zeros(1, 4, 4, 4), "latent")
    batch = np.random.default_rng(0).integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    path = save_npz(tmp_path / "s.npz", batch, np.arange(5))
    with np.load(path) as f:
        assert f["arr_0"].shape == (5, 8, 8, 3) and f["arr_0"].dtype == np.uint8
        assert np.array_equal(f["arr_0"], batch) and f["arr_1"].tolist() == [0, 1, 2, 3, 4]
    assert not list(tmp_path.glob(".*"))  # no temporary file left
    grid = Image.open(save_grid(tmp_path / "g.png", batch, ncols=3))
    assert grid.size == (3 * 65 + 1, 2 * 65 + 1)  # 8px enlarged x8 to 64, 1px padding


def test_blocks_receive_the_timestep_embedding_and_wrappers_see_it():
    """Wrappers keyed on the timestep alone (DyDiT, DiffCR) get t_emb through the block call."""
    m = model()
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, x, c, **kwargs):
            seen.append(kwargs["t_emb"])
            return self.block(x, c, **kwargs)

    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([5, 50, 500]), torch.tensor([1, 2, 3])
    before = m(x, t, y)
    m.blocks[1] = Spy(m.blocks[1])
    assert torch.equal(m(x, t, y), before)
    assert torch.equal(seen[0], m.t_embedder(t))


def test_original_checkpoint_files_guide_three_of_four_channels(tmp_path):
    from leandit.models import build_model, load_model

    torch.manual_seed(0)
    latent = randomize_(build_model("DiT-S/8", input_size=16, depth=1, num_classes=5), std=0.05)
    torch.save(latent.state_dict(), tmp_path / "DiT-S-8.pt")
    loaded = load_model(tmp_path / "DiT-S-8.pt").eval()
    assert loaded.config.guided_channels == 3
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.tensor([1, 4])
    cond, uncond = loaded(x, t, y), loaded(x, t, torch.full_like(y, 5))
    guided = loaded.forward_with_cfg(x, t, y, 4.0)
    assert torch.allclose(guided[:, :3], uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]), rtol=1e-4, atol=1e-4)
    assert torch.allclose(guided[:, 3:], cond[:, 3:], atol=1e-5)
    assert latent.config.guided_channels is None  # leandit's own models guide every channel
    assert build_model("DiT-S/2", depth=3).config.name == "DiT-S/2 (custom)"
    assert build_model("DiT-S/2", space="pixel").config.name == "DiT-S/2"
