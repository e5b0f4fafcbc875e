"""`leandit sample`: N images from a model -> a PNG grid and an ADM-layout .npz."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..diffusion import GaussianDiffusion, LinearFlow
from ..data.vae import load_vae
from ..evaluate.sampling import generate, make_labels, save_grid, save_npz, to_uint8_images
from ..train.distributed import resolve_device
from .common import add_model_options, log, open_model

SAMPLERS = GaussianDiffusion.samplers + LinearFlow.samplers


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="generate images: a PNG grid and an .npz (arr_0 = N x H x W x C uint8, arr_1 = labels)",
        description="Generate N class-conditional samples. Image i's noise is seeded by (--seed, i): the "
        "same command gives the same images whatever the batch size.",
    )
    p.add_argument("model", help="model folder, DiT/SiT checkpoint file (.pt/.safetensors), or a named size (random weights)")
    p.add_argument("--out", type=Path, required=True, help="output folder for samples.npz and grid.png")
    p.add_argument("--num", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--labels", default="balanced",
                   help="balanced (0,1,..,K-1,0,..), random (uniform, seeded), or comma-separated class ids (default balanced)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="ddpm or ddim for diffusion models, euler, heun or sde for flow models (default: ddim / heun)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: 50 for ddim and flow samplers, 250 for ddpm)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale; 1 = no guidance (default 1)")
    p.add_argument("--guided-channels", type=int, default=None,
                   help="guide only the first K prediction channels (the original DiT guides 3 of 4); default: all")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 = deterministic (default 0)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--vae", type=Path, default=None, help="local diffusers AutoencoderKL folder to decode latent models")
    p.add_argument("--grid-columns", type=int, default=None, help="columns of the PNG grid (default: number of classes up to 16, else sqrt(N))")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.num < 1:
        raise ValueError(f"--num must be at least 1, got {args.num}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    device = resolve_device(args.device)
    model = open_model(args.model, args, device=device, allow_random=True)
    config = model.config
    vae = None
    if config.space == "latent":
        if args.vae is None:
            raise ValueError("this model generates VAE latents: pass --vae PATH (a local diffusers AutoencoderKL folder)")
        vae = load_vae(args.vae, device)
    steps = args.steps if args.steps is not None else (250 if args.sampler == "ddpm" else 50)
    labels = make_labels(args.num, config.num_classes, args.labels, args.seed)
    started = time.perf_counter()
    x = generate(
        model,
        labels,
        sampler=args.sampler,
        steps=steps,
        cfg_scale=args.cfg_scale,
        guided_channels=args.guided_channels,
        eta=args.eta,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    images = to_uint8_images(x, config.space, vae)
    npz = save_npz(args.out / "samples.npz", images, labels.numpy())
    columns = args.grid_columns or (config.num_classes if config.num_classes <= 16 and args.labels == "balanced" else None)
    grid = save_grid(args.out / "grid.png", images, ncols=columns)
    log(f"{args.num} samples in {time.perf_counter() - started:.1f} s: {npz} ({images.shape[1]}x{images.shape[2]}x{images.shape[3]} uint8), grid {grid}")
    return 0
