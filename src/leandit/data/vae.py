"""The SD-VAE that maps images to the latents DiT/SiT work in: one place to load it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

LATENT_SCALE = 0.18215  # SD-VAE latents are multiplied by this for DiT training and divided before decoding
VAE_HINT = (
    "pass a local diffusers AutoencoderKL folder (config.json + weights), "
    "e.g. stabilityai/sd-vae-ft-ema or sd-vae-ft-mse saved with save_pretrained"
)


def read_vae_config(vae_path: str | os.PathLike) -> dict[str, Any]:
    """The VAE's config.json, read without diffusers or weights: enough for the latent shape,
    and cheap when a resumed extraction finds nothing left to encode."""
    path = Path(vae_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no VAE at {path}: {VAE_HINT}")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path / 'config.json'}: {err}; {VAE_HINT}") from None
    if not isinstance(config, dict) or "latent_channels" not in config or "block_out_channels" not in config:
        raise ValueError(f"{path} is not an AutoencoderKL folder (its config.json has no latent_channels): {VAE_HINT}")
    return config


def load_vae(vae_path: str | os.PathLike, device: torch.device | str = "cpu"):
    """A diffusers AutoencoderKL from a local folder, in eval mode on `device`."""
    read_vae_config(vae_path)
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(str(vae_path), low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"cannot load the VAE in {vae_path}: {str(err).splitlines()[0]}; {VAE_HINT}") from None
    return vae.to(device).eval()


def model_fingerprint(model_path: str | os.PathLike) -> str:
    """A hash of a model folder's config.json and weight files: sd-vae-ft-ema and
    sd-vae-ft-mse share a config and tensor shapes, and a resumed extraction must not mix the
    two (nor two fine-tunes of a text encoder)."""
    path = Path(model_path)
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for weights in sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt")):
        digest.update(weights.name.encode())
        with open(weights, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


vae_fingerprint = model_fingerprint
