"""Generating images from a model: labels, seeded noise, guidance, decoding, files.

Image i always gets the noise of its own seed (seed, i), so the same command gives the same
images whatever the batch size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..data.vae import LATENT_SCALE
from ..diffusion import PerSampleNoise, make_objective, mix_seed
from ..files import savez_atomically
from ..models.dit import DiT
from ..models.guidance import classifier_free_guidance



def make_labels(n: int, num_classes: int, mode: str = "balanced", seed: int = 0) -> torch.Tensor:
    """Class labels for n samples: "balanced" (0, 1, ..., K-1, 0, 1, ...), "random" (uniform,
    seeded) or a comma-separated list of ids that is repeated to length n."""
    if mode == "balanced":
        return torch.arange(n) % num_classes
    if mode == "random":
        return torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(mix_seed(seed, 0x1AB)))
    try:
        ids = [int(v) for v in mode.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"labels must be 'balanced', 'random' or comma-separated class ids, got {mode!r}") from None
    bad = [i for i in ids if not 0 <= i < num_classes]
    if not ids or bad:
        raise ValueError(f"class ids must be in 0..{num_classes - 1}, got {mode!r}")
    return torch.tensor(ids * (n // len(ids) + 1))[:n]


def model_fn_for(model: DiT, labels: torch.Tensor, cfg_scale: float = 1.0, guided_channels: int | None = None):
    """model(x, t) for these labels, with classifier-free guidance when cfg_scale != 1."""
    if cfg_scale == 1.0:
        return lambda x, t: model(x, t, labels)
    config = model.config
    channels = guided_channels or config.guided_channels or config.in_channels
    return lambda x, t: classifier_free_guidance(
        model, x, t, labels, scale=cfg_scale, null_class=config.num_classes, channels=channels
    )


def check_sampling_options(config, sampler: str | None, cfg_scale: float) -> str:
    """The sampler to use (the objective's default for None); refuses ones that do not fit."""
    objective = make_objective(config)
    sampler = sampler or objective.default_sampler
    if sampler not in objective.samplers:
        raise ValueError(f"sampler {sampler!r} does not fit a {config.objective} model; choose one of {objective.samplers}")
    if cfg_scale != 1.0 and not config.has_null_class:
        raise ValueError("this model has no null class: it cannot use classifier-free guidance (use --cfg-scale 1)")
    return sampler


@torch.no_grad()
def generate(
    model: DiT,
    labels: torch.Tensor,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    cfg_scale: float = 1.0,
    guided_channels: int | None = None,
    eta: float = 0.0,
    seed: int = 0,
    indices: Sequence[int] | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> torch.Tensor:
    """Samples in the model's own space (N, C, H, W): latents, or pixels in [-1, 1].

    `indices` are the global image numbers that seed each sample's noise (default 0..N-1).
    `eta` applies to DDIM only.
    """
    config = model.config
    objective = make_objective(config)
    sampler = check_sampling_options(config, sampler, cfg_scale)
    device = next(model.parameters()).device
    indices = list(range(len(labels))) if indices is None else list(indices)
    shape = (config.in_channels, config.input_size, config.input_size)
    model.eval()
    chunks = []
    starts = range(0, len(labels), batch_size)
    for start in tqdm(starts, disable=not progress, desc="sample", leave=False):
        y = labels[start : start + batch_size].to(device)
        noise = PerSampleNoise(seed, indices[start : start + batch_size], device)
        options = {"eta": eta} if objective.kind == "diffusion" else {}
        x = objective.sample(
            model_fn_for(model, y, cfg_scale, guided_channels),
            lambda: noise.randn(shape),
            sampler=sampler,
            steps=steps,
            clip_denoised=config.space == "pixel",
            **options,
        )
        chunks.append(x.float().cpu())
    return torch.cat(chunks)


@torch.no_grad()
def to_uint8_images(x: torch.Tensor, space: str, vae=None, batch_size: int = 32) -> np.ndarray:
    """Model-space samples -> uint8 images (N, H, W, C) in the ADM layout.

    Pixel models: [-1, 1] -> 0..255. Latent models: decoded by the VAE first.
    """
    if space == "latent":
        if vae is None:
            raise ValueError("this model generates VAE latents: pass the VAE to decode them (--vae PATH)")
        device = next(vae.parameters()).device
        decoded = [
            vae.decode(x[i : i + batch_size].to(device) / LATENT_SCALE).sample.float().cpu()
            for i in range(0, len(x), batch_size)
        ]
        x = torch.cat(decoded)
    images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (N, C, H, W)
    return images.permute(0, 2, 3, 1).numpy()  # (N, H, W, C)


def save_npz(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray | torch.Tensor) -> Path:
    """ADM sample file: arr_0 = images (N, H, W, C) uint8, arr_1 = labels; written atomically."""
    return savez_atomically(path, arr_0=images, arr_1=np.asarray(labels, dtype=np.int64))


def save_grid(path: str | os.PathLike, images: np.ndarray, ncols: int | None = None, min_side: int = 64, pad: int = 1) -> Path:
    """A PNG grid of uint8 images (N, H, W, C); small images are enlarged (nearest) to at
    least `min_side` pixels so that a person can see them."""
    n, h, w, c = images.shape
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    zoom = max(1, int(np.ceil(min_side / max(h, w))))
    h2, w2 = h * zoom, w * zoom
    canvas = np.full((nrows * (h2 + pad) + pad, ncols * (w2 + pad) + pad, c), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, k = divmod(i, ncols)
        big = image.repeat(zoom, axis=0).repeat(zoom, axis=1)
        canvas[pad + r * (h2 + pad) : pad + r * (h2 + pad) + h2, pad + k * (w2 + pad) : pad + k * (w2 + pad) + w2] = big
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas[..., 0] if c == 1 else canvas).save(path)
    return path
