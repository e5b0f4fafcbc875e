"""`leandit sample`: N images from a model -> an ADM-layout .npz and a PNG grid; resumable and
split across torchrun ranks (see evaluate/sample_run.py)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..backbones import Conditioning, backbone
from ..diffusion import GaussianDiffusion, LinearFlow, MaskedDiffusion
from ..data.vae import load_vae
from ..devices import check_compile, check_cuda_graphs, compile_for_sampling, resolve_precision, warn_slow_bf16
from ..diffusion import make_objective
from ..compress.step_cache import StepCache
from ..evaluate.inpainting import InpaintingRun
from ..models.inpaint import SPEC_HELP
from ..evaluate.sample_run import PartPlan, assemble, check_settings, first_images, make_parts, write_settings
from ..evaluate.sampling import (CFG_SCHEDULES, check_sampling_options, check_vae_fits, default_sampling_steps, generate,
                                 latent_scale_of, make_labels, masked_options, refuse_masked_only_options, save_grid,
                                 to_uint8_images)
from ..train.distributed import barrier, setup_distributed, teardown_distributed
from .common import add_model_options, duration, log, open_model, plural
from .sampler_options import add_sampler_options, cache_settings, sit_sampler_settings, solver_settings

SAMPLERS = tuple(dict.fromkeys(GaussianDiffusion.samplers + LinearFlow.samplers + MaskedDiffusion.samplers))


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="generate images: a PNG grid and an .npz (arr_0 = N x H x W x C uint8, arr_1 = labels)",
        description="Generate N class-conditional samples (50,000 for the standard FID) into <out>/samples.npz "
        "(arr_0 = N x H x W x C uint8, arr_1 = labels) and a grid of the first images. Image i's noise is seeded by "
        "(--seed, i): the same command gives the same images whatever the batch size or number of processes. Images "
        "are made in parts under <out>/parts/: rerunning an interrupted command makes only the missing parts; "
        "torchrun splits the parts across processes.",
    )
    p.add_argument("model", help="model folder, DiT/SiT checkpoint file (.pt/.safetensors), or a named size (random weights)")
    p.add_argument("--out", type=Path, required=True, help="output folder for samples.npz and grid.png")
    p.add_argument("--num-samples", type=int, default=None,
                   help="number of samples (default 64; 50000 for the standard FID; with --inpaint: the first N images, default all)")
    p.add_argument("--labels", default="balanced",
                   help="class-conditional models: balanced (0,1,..,K-1,0,..), random (uniform, seeded), or comma-separated "
                   "class ids (default balanced)")
    p.add_argument("--prompts", type=Path, default=None,
                   help="text-to-image models: the prompt embeddings from 'leandit encode-prompts' (image i gets prompt "
                   "i mod P; arr_1 of samples.npz holds the prompt numbers; guidance uses the file's empty prompt)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="ddpm or ddim for diffusion models; for flow (SiT) models euler or heun (plain grid), sde "
                   "(SiT's Euler-Maruyama SDE with its last step, the sampler of its reported FIDs) or dopri5 (SiT's "
                   "adaptive ODE); for both dpm++2m (DPM-Solver++ 2M) or unipc (diffusers' schedulers); mar for MAR "
                   "models (default: ddim / heun / mar)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: 250 for ddpm and sde, 20 for dpm++2m and unipc, 50 otherwise; for sde "
                   "the model evaluations, for dopri5 the times of SiT's output grid); for MAR the unmasking iterations, "
                   "1 to the number of tokens (default 64, or one per token when fewer)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale; 1 = no guidance (default 1)")
    p.add_argument("--cfg-schedule", choices=CFG_SCHEDULES, default=None,
                   help="MAR: the guidance scale over the iterations: linear (1 rising to --cfg-scale as tokens are known, "
                   "MAR's) or constant (default linear)")
    p.add_argument("--temperature", type=float, default=None,
                   help="MAR: multiplies the noise of the head's DDPM steps; 0 = the posterior means (default 1)")
    p.add_argument("--head-steps", default=None,
                   help="MAR: DDPM steps of the head per token, respaced from its training timesteps: a count, 'ddimN' "
                   "(a constant stride) or counts per section (default: the model's head_sampling_steps, 100 in MAR)")
    p.add_argument("--guided-channels", type=int, default=None,
                   help="guide only the first K prediction channels (the original DiT guides 3 of 4); default: all")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 = deterministic (default 0)")
    add_sampler_options(p)
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--vae", type=Path, default=None,
                   help="local diffusers AutoencoderKL folder to decode latent models (default for a pipeline folder: its vae/)")
    p.add_argument("--part-size", type=int, default=1000, help="images per part file: the unit of resuming and of splitting across processes (default 1000)")
    p.add_argument("--grid", type=int, default=100, help="images in grid.png, the first ones (default 100; 0 = no grid)")
    p.add_argument("--grid-columns", type=int, default=None, help="columns of the PNG grid (default: number of classes up to 16, else sqrt(N))")
    p.add_argument("--inpaint", metavar="MASKS", default=None,
                   help=f"inpainting models: complete --images where MASKS says the pixels are unknown: {SPEC_HELP}. The known "
                   "pixels are pasted back at the end (kept exactly); masks.npz records the masks, grid.png shows masked "
                   "input / completion / original")
    p.add_argument("--images", default=None,
                   help="with --inpaint: an .npz (arr_0 = N x H x W x C uint8, arr_1 = labels) or 'digits' (the 450 "
                   "held-out digits of the digits feature net's split)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="fp32, or bf16 autocast (faster on GPUs and on CPUs with native bf16; recorded: parts of a folder "
                        "share it) (default fp32)")
    p.add_argument("--compile", action="store_true", help="run the model through torch.compile (slower start, faster steps)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="GPU only: torch.compile with CUDA graphs (mode reduce-overhead); best with --part-size a multiple of --batch-size")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_options(p)
    p.set_defaults(run=run)


def _check_plain_options(args: argparse.Namespace) -> None:
    """The options that need no model: checked before it is read."""
    for option in ("num_samples", "batch_size", "part_size"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            raise ValueError(f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    if args.temperature is not None and not 0 <= args.temperature < float("inf"):
        raise ValueError(f"--temperature must be 0 (the head's posterior means) or more, got {args.temperature:g}")
    if args.grid < 0:
        raise ValueError(f"--grid must be 0 (no grid) or a number of images, got {args.grid}")
    if args.grid_columns is not None and args.grid_columns < 1:
        raise ValueError(f"--grid-columns must be at least 1, got {args.grid_columns}")
    if args.eta < 0:
        raise ValueError(f"--eta must be 0 (deterministic DDIM) or more, got {args.eta:g}")
    if args.eta != 0 and args.sampler not in (None, "ddim"):
        raise ValueError(f"--eta applies to --sampler ddim only, not {args.sampler}")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is a file: pass a folder")


def _check_model_options(args: argparse.Namespace, spec, sampler: str, steps: int) -> None:
    """The options that depend on the model, all before anything is written."""
    objective = make_objective(spec)
    if args.eta != 0 and sampler != "ddim":
        raise ValueError(f"--eta applies to DDIM only; this {spec.objective} model samples with {sampler}")
    if objective.kind == "masked":
        if args.guided_channels is not None:
            raise ValueError("--guided-channels does not apply to MAR: guidance acts on every channel of the head's epsilon")
        return  # --steps (iterations) and the head's options: checked by masked_options
    limit = getattr(objective, "num_timesteps", None)
    if limit is not None and steps > limit:
        raise ValueError(f"--steps must be at most {limit} (the model's diffusion timesteps), got {steps}")
    if args.guided_channels is not None and not 1 <= args.guided_channels <= spec.in_channels:
        raise ValueError(f"--guided-channels must be between 1 and the model's {spec.in_channels} channels, got {args.guided_channels}")


def run(args: argparse.Namespace) -> int:
    _check_plain_options(args)
    dist = setup_distributed(args.device)
    try:
        resolve_precision(args.precision, dist.device)
        if args.compile or args.cuda_graphs:
            check_compile(dist.device)
        if args.cuda_graphs:
            check_cuda_graphs(dist.device)
        if dist.is_main:
            warn_slow_bf16(args.precision, dist.device)
        torch.manual_seed(args.seed)  # a named size's random weights: the same on every rank and every resume
        model = open_model(args.model, args, device=dist.device, allow_random=True)
        spec = backbone(model).spec
        inpaint = InpaintingRun.for_command(model, args)  # None: ordinary sampling
        if inpaint is None and args.num_samples is None:
            args.num_samples = 64
        vae = None
        if args.vae is not None and spec.space != "latent":
            raise ValueError(f"--vae applies to latent-space models; this model is in {spec.space} space")
        if spec.space == "latent":
            if args.vae is None and (Path(args.model) / "model_index.json").exists() and (Path(args.model) / "vae").is_dir():
                args.vae = Path(args.model) / "vae"  # a pipeline folder brings its own VAE
            if args.vae is None:
                raise ValueError("this model generates VAE latents: pass --vae PATH (a local diffusers AutoencoderKL folder)")
            vae = load_vae(args.vae, dist.device)
            check_vae_fits(vae, spec.in_channels, f"{args.model}")
        conditions = ImageConditions.for_model(spec.conditioning, args)
        # Everything is checked before anything is written; a default given explicitly is the
        # same setting as the default (the settings hold resolved values).
        sampler = check_sampling_options(spec, args.sampler, args.cfg_scale, conditions.conditioning)
        refuse_masked_only_options(spec, temperature=args.temperature, cfg_schedule=args.cfg_schedule, head_steps=args.head_steps)
        mar = masked_options(spec, args.steps, args.temperature, args.cfg_schedule, args.head_steps) if spec.objective == "masked" else {}
        steps = mar.pop("num_iter") if mar else args.steps if args.steps is not None else default_sampling_steps(sampler)
        _check_model_options(args, spec, sampler, steps)
        guided_channels = None if args.guided_channels == spec.channels_to_guide else args.guided_channels
        sde, ode = sit_sampler_settings(args, sampler)
        solver = solver_settings(args, sampler, spec.objective)
        cache = cache_settings(args)
        if cache is not None:
            model = StepCache(model, cache)  # refuses MAR
        labels = torch.from_numpy(inpaint.labels) if inpaint else conditions.labels(args.num_samples, args.seed)
        plan = PartPlan(inpaint.num if inpaint else args.num_samples, args.part_size)
        settings = {
            "model": str(args.model), "model_files": _files_stamp(args.model), "weights": args.weights, "objective": args.objective,
            "space": args.space, "num_heads": args.num_heads, "num": args.num_samples, "labels": args.labels, "seed": args.seed,
            "sampler": sampler, "steps": steps, "cfg_scale": args.cfg_scale, "guided_channels": guided_channels,
            "eta": args.eta, "vae": str(args.vae) if args.vae else None, "part_size": args.part_size,
        }
        if mar:  # MAR's own settings (absent for other models, whose older folders resume as before)
            settings.update(mar)
        if sde is not None:  # the sampler's own settings (absent for the others: older folders resume as before)
            settings["sde"] = sde.record()
        if ode is not None:
            settings["ode"] = ode.record()
        if solver is not None:
            settings["solver"] = solver.record()
        if cache is not None:
            settings["cache"] = cache.record()
        if args.precision != "fp32":  # absent at the default: older folders resume as before
            settings["precision"] = args.precision
        if args.prompts is not None:
            settings.update(prompts=str(args.prompts), prompts_files=_files_stamp(str(args.prompts)))
        if inpaint:
            settings.update(num=inpaint.num, **inpaint.settings())
        check_settings(args.out, settings)  # every rank refuses alike; written with the first part

        if args.compile or args.cuda_graphs:
            if spec.objective == "masked":
                raise ValueError("--compile and --cuda-graphs apply to DiT/SiT/diffusers models; a MAR loop samples eager: leave them out")
            compile_for_sampling(model, dist.device, args.cuda_graphs)
        autocast = torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

        def render(indices: range) -> np.ndarray:
            with autocast:
                x = _generate(indices)
            if inpaint:
                return to_uint8_images(x.float(), spec.space)
            return to_uint8_images(x.float(), spec.space, vae, scale=latent_scale_of(spec))

        def _generate(indices: range) -> torch.Tensor:
            if inpaint:
                return inpaint.complete(model, indices, sampler=sampler, steps=steps, cfg_scale=args.cfg_scale,
                                        guided_channels=guided_channels, eta=args.eta, batch_size=args.batch_size)
            return generate(model, conditions.condition(labels[indices.start : indices.stop]), sampler=sampler, steps=steps,
                            cfg_scale=args.cfg_scale, guided_channels=guided_channels, eta=args.eta, seed=args.seed,
                            indices=indices, batch_size=args.batch_size, progress=False, conditioning=conditions.conditioning,
                            sde=sde, ode=ode, solver=solver, **mar)

        started = time.perf_counter()
        mine = plan.parts_of(dist.rank, dist.world_size)
        bar = tqdm(total=len(mine), disable=args.quiet or not dist.is_main, desc="parts", dynamic_ncols=True)
        made = make_parts(plan, args.out, dist.rank, dist.world_size, render, labels.numpy(),
                          progress=lambda done, total: bar.update(done - bar.n),
                          before_write=lambda: write_settings(args.out, settings))
        bar.close()
        barrier()
        if dist.is_main:
            npz = assemble(plan, args.out)
            log(f"{plural(plan.num, 'sample')} ({plural(plan.num_parts, 'part')}, {made} made by this process in "
                f"{duration(time.perf_counter() - started)} on {dist.world_size} x {dist.device}): {npz}")
            if inpaint:
                completions = first_images(plan, args.out, args.grid)[0] if args.grid > 0 else None
                written = inpaint.write_extras(args.out, completions, args.grid, args.grid_columns)
                log(f"masks and the grid of masked input / completion / original: {', '.join(map(str, written))}")
            elif args.grid > 0:
                images, grid_labels = first_images(plan, args.out, args.grid)
                columns = args.grid_columns or conditions.grid_columns()
                grid = save_grid(args.out / "grid.png", images, ncols=columns, column_labels=_column_labels(grid_labels, columns, conditions))
                log(f"grid of the first {len(images)}: {grid}")
        barrier()
    finally:
        teardown_distributed()
    return 0


class ImageConditions:
    """What each image is conditioned on: `labels(n)` gives one number per image (a class id,
    or a prompt's index in the prompt file), `condition(numbers)` the model's input for them."""

    def __init__(self, conditioning: Conditioning, mode: str = "balanced", prompts: dict | None = None):
        self.conditioning = conditioning
        self.mode = mode  # how class ids are chosen (see make_labels)
        self.prompts = prompts

    @classmethod
    def for_model(cls, conditioning: Conditioning, args: argparse.Namespace) -> "ImageConditions":
        if conditioning.kind == "text":
            if args.prompts is None:
                raise ValueError("this is a text-to-image model: pass --prompts EMB.safetensors (made by 'leandit encode-prompts')")
            if args.labels != "balanced":
                raise ValueError("--labels applies to class-conditional models; a text-to-image model samples from --prompts")
            from ..data.text import load_prompt_embeddings

            prompts = load_prompt_embeddings(args.prompts)
            null = {"text": prompts["null_text"], "text_mask": prompts["null_text_mask"]}
            return cls(conditioning.with_null(null), prompts=prompts)
        if args.prompts is not None:
            raise ValueError(f"--prompts applies to text-to-image models; this model is conditioned on {conditioning.describe()}")
        return cls(conditioning, mode=args.labels)

    def labels(self, n: int, seed: int) -> torch.Tensor:
        if self.prompts is not None:
            return torch.arange(n) % self.prompts["text"].shape[0]
        return make_labels(n, self.conditioning.num_classes, self.mode, seed)

    def condition(self, numbers: torch.Tensor):
        if self.prompts is None:
            return numbers
        return {"text": self.prompts["text"][numbers], "text_mask": self.prompts["text_mask"][numbers]}

    def grid_columns(self) -> int | None:
        count = self.prompts["text"].shape[0] if self.prompts is not None else self.conditioning.num_classes
        if count <= 16 and (self.prompts is not None or self.mode == "balanced"):
            return count
        return None


def _column_labels(labels: np.ndarray, columns: int | None, conditions: "ImageConditions") -> list[str] | None:
    """What each grid column shows (its class, or prompt number), when every column shows one."""
    if not columns or len(labels) == 0:
        return None
    per_column = [set(labels[k::columns].tolist()) for k in range(min(columns, len(labels)))]
    if any(len(values) != 1 for values in per_column):
        return None
    word = "prompt " if conditions.prompts is not None else ""
    return [f"{word}{values.pop()}" for values in per_column]


def _files_stamp(spec: str) -> list | None:
    """Size and modification time of a model's weight files: retrained weights in the same
    place must not be mixed with parts made from the old ones."""
    path = Path(spec)
    if not path.exists():
        return None  # a named size: its weights follow from the seed
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
