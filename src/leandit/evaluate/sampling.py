"""Generating images from a model: labels, seeded noise, guidance, decoding, files.

Image i always gets the noise of its own seed (seed, i), so the same command gives the same
images whatever the batch size. A DiT/SiT is sampled by its objective's sampler calling the
model once per step; a MAR model by its own unmasking loop (`MaskedDiffusion.generate`: the
encoder/decoder once per iteration, the head's DDPM on the tokens each iteration predicts),
whose order and head noise come from the same per-image streams.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from torch import nn

from ..backbones import BackboneSpec, Cond, Conditioning, backbone, cond_batch_size, cond_slice, cond_to
from ..data.vae import LATENT_SCALE
from ..diffusion import PerSampleNoise, make_objective, mix_seed
from ..diffusion.sit_samplers import ODESettings, SDESettings
from ..diffusion.solvers import DEFAULT_SOLVER_STEPS, SOLVERS, SolverSettings
from ..compress.step_cache import reset_step_caches
from ..files import savez_atomically, write_atomically
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


def model_fn_for(
    model: nn.Module,
    cond: Cond,
    cfg_scale: float = 1.0,
    guided_channels: int | None = None,
    conditioning: Conditioning | None = None,
):
    """model_fn(x, t) for this conditioning (labels (N,) or text embeddings), with
    classifier-free guidance when cfg_scale != 1 (`conditioning` supplies the unconditional
    input: the model's own by default; a text model's comes with its prompt file)."""
    adapter = backbone(model)
    if cfg_scale == 1.0:
        return lambda x, t: adapter.predict(x, t, cond)
    spec = adapter.spec
    conditioning = conditioning or spec.conditioning
    unconditional = conditioning.null(cond_batch_size(cond), _device_of(cond))
    channels = guided_channels or spec.channels_to_guide
    return lambda x, t: classifier_free_guidance(
        adapter.predict, x, t, cond, scale=cfg_scale, channels=channels, unconditional=unconditional
    )


def _device_of(cond: Cond) -> torch.device:
    return cond.device if isinstance(cond, torch.Tensor) else next(iter(cond.values())).device


# MAR's generation settings: unmasking iterations (MAR's default 64; at most one per token),
# the guidance schedule and the head's sampling temperature (MAR's defaults).
MAR_ITERATIONS = 64
CFG_SCHEDULES = ("linear", "constant")


def masked_options(
    spec: BackboneSpec,
    steps: int | None = None,
    temperature: float | None = None,
    cfg_schedule: str | None = None,
    head_steps: int | str | None = None,
) -> dict:
    """The resolved generation options of a MAR model ({"num_iter", "temperature",
    "cfg_schedule", "head_steps"}), each checked; one-line errors in the CLI's words."""
    config = spec.objective_config
    tokens = config.num_tokens
    if steps is not None and not 1 <= steps <= tokens:
        raise ValueError(f"--steps for a MAR model is the number of unmasking iterations: 1 to its {tokens} tokens "
                         f"(at least one token per iteration), got {steps}")
    if temperature is not None and not (temperature >= 0 and temperature < float("inf")):
        raise ValueError(f"--temperature must be 0 (the head's posterior means) or more, got {temperature:g}")
    if cfg_schedule is not None and cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"--cfg-schedule must be one of {', '.join(CFG_SCHEDULES)}, got {cfg_schedule!r}")
    if head_steps is not None:
        from ..diffusion.masked import head_spacing

        head_steps = head_spacing(head_steps, config.head_timesteps)
    return {
        "num_iter": steps if steps is not None else min(MAR_ITERATIONS, tokens),
        "temperature": 1.0 if temperature is None else float(temperature),
        "cfg_schedule": cfg_schedule or "linear",
        "head_steps": head_steps if head_steps is not None else config.head_sampling_steps,
    }


def refuse_masked_only_options(spec: BackboneSpec, **given) -> None:
    """MAR's own options (given = not None) on another model: a one-line error."""
    named = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is not None]
    if named and spec.objective != "masked":
        raise ValueError(f"{', '.join(named)} {'applies' if len(named) == 1 else 'apply'} to MAR models only; "
                         f"this is a {spec.family} ({spec.objective}) model")


DEFAULT_STEPS = {"ddpm": 250, "sde": 250, **dict.fromkeys(SOLVERS, DEFAULT_SOLVER_STEPS)}  # the rest: 50


def default_sampling_steps(sampler: str) -> int:
    """Steps of a sampler when none are asked: DDPM's and SiT's SDE's 250 (their papers'),
    the multistep solvers' 20, 50 for DDIM and the ODE samplers."""
    return DEFAULT_STEPS.get(sampler, 50)


def check_sampling_options(
    spec: BackboneSpec, sampler: str | None, cfg_scale: float, conditioning: Conditioning | None = None
) -> str:
    """The sampler to use (the objective's default for None); refuses ones that do not fit."""
    objective = make_objective(spec)
    sampler = sampler or objective.default_sampler
    if sampler not in objective.samplers:
        raise ValueError(f"sampler {sampler!r} does not fit a {spec.objective} model; choose one of {objective.samplers}")
    conditioning = conditioning or spec.conditioning
    if cfg_scale != 1.0 and not conditioning.has_null:
        if conditioning.kind == "class":
            raise ValueError("this model has no null class: it cannot use classifier-free guidance (use --cfg-scale 1)")
        raise ValueError(f"guidance needs an unconditional input, which this {conditioning.describe()} model lacks (use --cfg-scale 1)")
    return sampler


@torch.no_grad()
def generate(
    model: nn.Module,
    labels: Cond,
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
    conditioning: Conditioning | None = None,
    temperature: float | None = None,
    cfg_schedule: str | None = None,
    head_steps: int | str | None = None,
    sde: SDESettings | None = None,
    ode: ODESettings | None = None,
    solver: SolverSettings | None = None,
) -> torch.Tensor:
    """Samples in the model's own space (N, C, H, W): latents, or pixels in [-1, 1].

    `labels` is the conditioning of each image: class ids (N,), or for a text model the
    prompt embeddings {"text": (N, L, D), "text_mask": (N, L)} with `conditioning` carrying the
    empty prompt for guidance. `indices` are the global image numbers that seed each sample's
    noise (default 0..N-1). `eta` applies to DDIM only, `sde` and `ode` (SiT's SDE and dopri5
    options) to flow models' sde and dopri5 samplers.

    MAR models (objective "masked"): `steps` is the number of unmasking iterations (default
    64, or one per token when fewer), `temperature` scales the head's DDPM step noise (0: the
    posterior means), `cfg_schedule` is "linear" (MAR's) or "constant", `head_steps` the
    head's respaced DDPM length (default the config's); these three are refused elsewhere.
    """
    adapter = backbone(model)
    spec = adapter.spec
    objective = make_objective(spec)
    sampler = check_sampling_options(spec, sampler, cfg_scale, conditioning)
    refuse_masked_only_options(spec, temperature=temperature, cfg_schedule=cfg_schedule, head_steps=head_steps)
    if (sde is not None or ode is not None) and objective.kind != "flow":
        raise ValueError(f"SDE and ODE sampler options apply to flow (SiT) models; this one is a {spec.objective} model")
    masked = objective.kind == "masked"
    if masked:
        mar = masked_options(spec, steps, temperature, cfg_schedule, head_steps)
        if guided_channels is not None and guided_channels != spec.in_channels:
            raise ValueError("--guided-channels does not apply to MAR: guidance acts on every channel of the head's epsilon")
        if eta != 0:
            raise ValueError("--eta applies to DDIM only; a MAR model samples with its own loop")
    device = next(model.parameters()).device
    count = cond_batch_size(labels)
    indices = list(range(count)) if indices is None else list(indices)
    shape = spec.input_shape
    model.eval()
    chunks = []
    starts = range(0, count, batch_size)
    for start in tqdm(starts, disable=not progress, desc="sample", leave=False):
        y = cond_to(cond_slice(labels, slice(start, start + batch_size)), device)
        noise = PerSampleNoise(seed, indices[start : start + batch_size], device)
        if masked:
            chunks.append(adapter.generate(y, noise, cfg_scale=cfg_scale, **mar).float().cpu())
            continue
        reset_step_caches(model)  # each chunk is a trajectory of its own
        options = {"eta": eta} if objective.kind == "diffusion" else {"sde": sde, "ode": ode}
        if solver is not None:
            options["solver"] = solver
        x = objective.sample(
            model_fn_for(model, y, cfg_scale, guided_channels, conditioning),
            lambda: noise.randn(shape),
            sampler=sampler,
            steps=steps,
            clip_denoised=spec.space == "pixel",
            **options,
        )
        chunks.append(x.float().cpu())
    return torch.cat(chunks)


def vae_latent_channels(vae) -> int | None:
    """The latent channels a VAE decodes (its config's latent_channels), None if it does not say."""
    value = getattr(getattr(vae, "config", None), "latent_channels", None)
    return int(value) if value is not None else None


def check_vae_fits(vae, channels: int, what: str = "this model") -> None:
    """Refuse a VAE whose latents have another number of channels than the model generates
    (an SD VAE's 4 for MAR's 16-channel KL-16 latents, or the reverse)."""
    latent = vae_latent_channels(vae)
    if latent is not None and latent != channels:
        raise ValueError(f"the VAE decodes {latent}-channel latents but {what} generates {channels}-channel ones: "
                         "pass the VAE the model was trained with (--vae PATH; MAR's is the 16-channel KL-16)")


def latent_scale_of(spec: BackboneSpec) -> float | None:
    """What the model's latents were multiplied by, when the model records it (MAR: its
    config's latent_scale, 0.2325 for KL-16); None: the VAE's own scaling factor applies."""
    return getattr(spec.objective_config, "latent_scale", None) if spec.objective == "masked" else None


@torch.no_grad()
def to_uint8_images(x: torch.Tensor, space: str, vae=None, batch_size: int = 32, scale: float | None = None) -> np.ndarray:
    """Model-space samples -> uint8 images (N, H, W, C) in the ADM layout.

    Pixel models: [-1, 1] -> 0..255. Latent models: decoded by the VAE first, after dividing
    by `scale` (default: the VAE's config.scaling_factor; a MAR model passes its own
    latent_scale, see `latent_scale_of`).
    """
    if space == "latent":
        if vae is None:
            raise ValueError("this model generates VAE latents: pass the VAE to decode them (--vae PATH)")
        check_vae_fits(vae, x.shape[1], "the model")
        device = next(vae.parameters()).device
        # The VAE's own scaling factor (0.18215 for the SD VAEs of DiT/SiT/PixArt-alpha,
        # 0.13025 for PixArt-Sigma's SDXL VAE, 0.2325 for MAR's KL-16): latents were
        # multiplied by it when encoded.
        if scale is None:
            scale = float(getattr(getattr(vae, "config", None), "scaling_factor", None) or LATENT_SCALE)
        decoded = [
            vae.decode(x[i : i + batch_size].to(device) / scale).sample.float().cpu()
            for i in range(0, len(x), batch_size)
        ]
        x = torch.cat(decoded)
    images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (N, C, H, W)
    return images.permute(0, 2, 3, 1).numpy()  # (N, H, W, C)


def save_npz(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray | torch.Tensor) -> Path:
    """ADM sample file: arr_0 = images (N, H, W, C) uint8, arr_1 = labels; written atomically."""
    return savez_atomically(path, arr_0=images, arr_1=np.asarray(labels, dtype=np.int64))


def save_grid(
    path: str | os.PathLike,
    images: np.ndarray,
    ncols: int | None = None,
    min_side: int = 64,
    pad: int = 1,
    column_labels: Sequence[str] | None = None,
) -> Path:
    """A PNG grid of uint8 images (N, H, W, C); small images are enlarged (nearest) to at
    least `min_side` pixels so that a person can see them. `column_labels` are written above
    the columns (say, the class of each column)."""
    n, h, w, c = images.shape
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    zoom = max(1, int(np.ceil(min_side / max(h, w))))
    h2, w2 = h * zoom, w * zoom
    top = 14 if column_labels else 0  # a strip for the labels
    canvas = np.full((top + nrows * (h2 + pad) + pad, ncols * (w2 + pad) + pad, c), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, k = divmod(i, ncols)
        big = image.repeat(zoom, axis=0).repeat(zoom, axis=1)
        y0 = top + pad + r * (h2 + pad)
        canvas[y0 : y0 + h2, pad + k * (w2 + pad) : pad + k * (w2 + pad) + w2] = big
    picture = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    if column_labels:
        from PIL import ImageDraw

        draw = ImageDraw.Draw(picture)
        for k, label in enumerate(list(column_labels)[:ncols]):
            x = pad + k * (w2 + pad) + w2 / 2
            draw.text((x, top / 2), str(label), fill=0 if c == 1 else (0, 0, 0), anchor="mm")
    return write_atomically(path, lambda f: picture.save(f, format="PNG"))
