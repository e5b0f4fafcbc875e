"""The VAEs that map images to the latents the models work in: one place to load them.

- a local diffusers AutoencoderKL folder (the SD-VAE of DiT/SiT, `stabilityai/sd-vae-ft-ema`
  saved with save_pretrained, or a pipeline's vae/);
- an LDM-format KL autoencoder checkpoint file, such as MAR's KL-16 (`kl16.ckpt`: LDM's
  AutoencoderKL with ch 128, ch_mult (1, 1, 2, 2, 4), 2 res blocks a level, 16 latent channels,
  two attention blocks at the encoder's lowest resolution). It is read as a diffusers
  AutoencoderKL: the architecture from the tensors' shapes, the keys converted by diffusers'
  own LDM conversion, the latent scale 0.2325 (MAR's) for 16 latent channels.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

LATENT_SCALE = 0.18215  # SD-VAE latents are multiplied by this for DiT training and divided before decoding
KL16_LATENT_SCALE = 0.2325  # MAR multiplies its KL-16 latents by this
VAE_HINT = (
    "pass a local diffusers AutoencoderKL folder (config.json + weights), "
    "e.g. stabilityai/sd-vae-ft-ema or sd-vae-ft-mse saved with save_pretrained, "
    "or an LDM KL-VAE checkpoint file such as MAR's kl16.ckpt"
)
# The tensors of an LDM KL autoencoder; LDM training checkpoints add their loss (LPIPS and a
# discriminator) under "loss.", which a VAE does not need.
_LDM_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
_LDM_PREFIXES = ("first_stage_model.", "vae.")  # a VAE inside a whole LDM / SD checkpoint
_LDM_TRAINING_ONLY = ("loss.",)


def read_vae_config(vae_path: str | os.PathLike) -> dict[str, Any]:
    """The VAE's config: a folder's config.json, read without diffusers or weights (cheap when
    a resumed extraction finds nothing left to encode), or the diffusers config an LDM
    checkpoint file's tensor shapes describe."""
    path = Path(vae_path)
    if path.is_file():
        return ldm_vae_config(read_ldm_vae_state_dict(path), source=str(path))
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
    """A diffusers AutoencoderKL from a local folder or an LDM checkpoint file (kl16.ckpt), in
    eval mode on `device`."""
    if Path(vae_path).is_file():
        return vae_from_ldm_checkpoint(vae_path).to(device).eval()
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
    if path.is_file():  # a checkpoint file (kl16.ckpt): its bytes are the model
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        return digest.hexdigest()[:16]
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for weights in sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt")):
        digest.update(weights.name.encode())
        with open(weights, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


vae_fingerprint = model_fingerprint


# ------------------------------------------------------------------ LDM checkpoint files


def read_ldm_vae_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The LDM-named tensors of a KL autoencoder checkpoint file: a state dict, possibly under
    "model" (MAR's kl16.ckpt) or "state_dict" (an LDM training checkpoint, whose "loss." tensors
    are dropped), possibly prefixed "first_stage_model." (a whole LDM/SD checkpoint)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..models.infer import CheckpointError
    from ..models.io import _torch_load

    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            obj: Any = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0][:160]}); is it complete?") from None
    else:
        try:
            obj = _torch_load(path, trust=False)
        except CheckpointError as err:
            if "trust_checkpoint" not in str(err):
                raise
            # --vae has no trust option: say how to keep only the tensors, once, from a trusted file.
            raise CheckpointError(
                f"{path}: pickles Python objects other than tensors; if you trust the file, keep only its state dict "
                f"once: python -c \"import torch; c = torch.load('{path}', weights_only=False); "
                f"torch.save(c.get('model', c.get('state_dict', c)), 'vae-tensors.ckpt')\" and pass vae-tensors.ckpt"
            ) from None
    if isinstance(obj, Mapping):
        for entry in ("state_dict", "model"):
            if isinstance(obj.get(entry), Mapping):
                obj = obj[entry]
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a VAE state dict; {VAE_HINT}")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for prefix in _LDM_PREFIXES:
        if any(k.startswith(prefix + "encoder.") for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    if "encoder.conv_in.weight" not in sd or "decoder.conv_out.weight" not in sd:
        shown = ", ".join(list(obj)[:4])
        raise CheckpointError(
            f"{path}: not a VAE checkpoint (no encoder.conv_in.weight and decoder.conv_out.weight of an LDM KL "
            f"autoencoder; found keys like {shown}); {VAE_HINT}"
        )
    sd = {k: v for k, v in sd.items() if not k.startswith(_LDM_TRAINING_ONLY)}
    foreign = [k for k in sd if not k.startswith(_LDM_PARTS)]
    if foreign:
        raise CheckpointError(f"{path}: unexpected keys in a KL VAE checkpoint: {_short(foreign)}")
    return sd


def ldm_vae_config(state_dict: Mapping[str, torch.Tensor], *, source: str = "state dict", norm_num_groups: int = 32) -> dict[str, Any]:
    """The diffusers AutoencoderKL config (constructor arguments) of an LDM KL autoencoder,
    from its tensors' shapes: levels and widths from encoder.down.{i}, res blocks a level,
    which levels attend, latent channels, in/out channels. GroupNorm's group count is not in
    the tensors: LDM's is 32."""
    from ..models.infer import CheckpointError

    sd = state_dict
    levels = _indices(sd, r"encoder\.down\.(\d+)\.")
    if not levels or levels != list(range(len(levels))):
        raise CheckpointError(f"{source}: encoder.down levels are {levels}, not 0..n-1")
    layers = len(_indices(sd, r"encoder\.down\.0\.block\.(\d+)\."))
    try:
        widths = [int(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in levels]
        latent = int(sd["post_quant_conv.weight"].shape[0] if "post_quant_conv.weight" in sd else sd["decoder.conv_in.weight"].shape[1])
        moments = int(sd["encoder.conv_out.weight"].shape[0])
    except KeyError as err:
        raise CheckpointError(f"{source}: a KL VAE checkpoint without {err.args[0]}") from None
    if moments != 2 * latent:
        raise CheckpointError(
            f"{source}: encoder.conv_out gives {moments} channels for {latent} latent channels: not a KL (Gaussian) "
            "autoencoder with mean and log-variance"
        )
    n = len(levels)
    down = ["AttnDownEncoderBlock2D" if f"encoder.down.{i}.attn.0.q.weight" in sd else "DownEncoderBlock2D" for i in levels]
    # diffusers lists the decoder's blocks from the lowest resolution up: LDM's up.{n-1} first.
    up = ["AttnUpDecoderBlock2D" if f"decoder.up.{n - 1 - i}.attn.0.q.weight" in sd else "UpDecoderBlock2D" for i in levels]
    return {
        "in_channels": int(sd["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(sd["decoder.conv_out.weight"].shape[0]),
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": widths,
        "layers_per_block": layers,
        "act_fn": "silu",
        "latent_channels": latent,
        "norm_num_groups": norm_num_groups,
        "sample_size": 256,
        "scaling_factor": KL16_LATENT_SCALE if latent == 16 else LATENT_SCALE,
        "use_quant_conv": "quant_conv.weight" in sd,
        "use_post_quant_conv": "post_quant_conv.weight" in sd,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in sd,
    }


def convert_ldm_vae(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """LDM names -> diffusers names, by diffusers' own `convert_ldm_vae_checkpoint`, plus the
    per-level attention it does not map (it converts the middle block's only and copies
    `encoder.down.{i}.attn.*` under its LDM name): converted with diffusers' attention mapping."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, update_vae_attentions_ldm_to_diffusers

    sd = dict(state_dict)
    converted = convert_ldm_vae_checkpoint(sd, dict(config))
    n = len(config["down_block_types"])
    for i in range(n):
        for old, new in ((f"encoder.down.{i}.attn", f"encoder.down_blocks.{i}.attentions"),
                         (f"decoder.up.{n - 1 - i}.attn", f"decoder.up_blocks.{i}.attentions")):
            keys = [k for k in sd if k.startswith(old + ".")]
            for key in keys:
                converted.pop(key, None)
            update_vae_attentions_ldm_to_diffusers(keys, converted, sd, mapping={"old": old, "new": new})
    return converted


def vae_from_ldm_checkpoint(path: str | os.PathLike):
    """A diffusers AutoencoderKL holding an LDM checkpoint file's weights (strict: a missing,
    unexpected or mis-shaped tensor is an error naming it, in diffusers' names)."""
    from diffusers import AutoencoderKL

    from ..models.infer import check_keys

    sd = read_ldm_vae_state_dict(path)
    config = ldm_vae_config(sd, source=str(path))
    converted = convert_ldm_vae(sd, config)
    with torch.device("meta"):  # no random init of 66 M weights that are replaced at once
        vae = AutoencoderKL(**config)
    check_keys(vae.state_dict(), converted, f"{path} (converted to diffusers' AutoencoderKL names)")
    vae.load_state_dict({k: v.contiguous() for k, v in converted.items()}, strict=True, assign=True)
    return vae


def _indices(sd: Mapping[str, Any], pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd if (m := regex.match(k))})


def _short(keys: list[str], limit: int = 5) -> str:
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")
