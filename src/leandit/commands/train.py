"""`leandit train`: train or fine-tune a backbone on its own objective with the one loop.

Settings come from, in order of precedence: the command line, a recipe file (`--recipe`,
JSON whose keys are the option names with underscores), and the defaults below. The resolved
settings are written to `<out>/run.json` so that a run can be repeated exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from ..backbones import backbone
from ..data import open_training_data
from ..diffusion import make_objective
from ..models import build_model, save_model
from ..models.inpaint import SPEC_HELP, InpaintModel, inpaint_layer, parse_masks
from ..models.io import is_named_size, parse_named_size
from ..train import DenoisingJob, LoopConfig, Trainer, setup_distributed, teardown_distributed
from ..train.distributed import barrier
from ..train.loop import PRECISIONS
from ..train.schedules import LR_SCHEDULES
from .common import (
    check_resume,
    duration,
    check_data_option,
    add_model_options,
    add_overwrite_option,
    check_data_fits,
    claim_out,
    data_conditioning,
    log,
    open_model,
    plural,
    write_run_record,
)

KIND = {"command": "train"}

# The loop's own settings keep the loop's defaults (LoopConfig is where they live).
_LOOP = {f.name: f.default for f in dataclasses.fields(LoopConfig) if f.default is not dataclasses.MISSING}
_LOOP_FIELDS = ("lr", "weight_decay", "lr_schedule", "warmup_steps", "final_lr_ratio", "ema_decay", "ema_warmup",
                "grad_clip", "precision", "compile", "checkpoint_every", "keep_checkpoints", "log_every", "seed", "num_workers")

# Every setting a recipe may hold, with its default (None: required).
DEFAULTS: dict[str, Any] = {
    "model": None,
    "model_overrides": {},
    "data": None,
    "steps": None,
    "batch_size": 256,
    **{name: _LOOP[name] for name in _LOOP_FIELDS},
    "class_dropout": None,
    "device": "auto",
    "inpaint": None,
}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train or fine-tune a DiT/SiT on its own objective",
        description="Train a backbone (a named size with fresh weights, or a model to fine-tune) on the "
        "embedded digits or on latent shards. Resumes automatically from the newest checkpoint in --out; "
        "Ctrl-C saves a checkpoint at the end of the current step. Runs on many GPUs with torchrun.",
    )
    p.add_argument("--recipe", type=Path, help="JSON file of settings (keys = option names with underscores); the command line overrides it")
    p.add_argument("--model", help="named size to train from scratch (e.g. DiT-S/2, SiT-XL/2) or a model folder / checkpoint to fine-tune")
    p.add_argument("--set", dest="set_fields", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a field of a named size's config, e.g. --set depth=14 --set in_channels=1 (repeatable)")
    p.add_argument("--data", help="'digits' (the embedded 8x8 digits) or a folder of latent shards from extract-features "
                   "(required: no default, on the command line or in the recipe)")
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoints/, metrics.jsonl, run.json and the final model/")
    p.add_argument("--steps", type=int, help="total optimisation steps (required)")
    p.add_argument("--batch-size", type=int, help=f"global batch size over all processes (default {DEFAULTS['batch_size']})")
    p.add_argument("--lr", type=float, help=f"AdamW learning rate (default {DEFAULTS['lr']})")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, help="learning-rate schedule after warm-up (default constant)")
    p.add_argument("--warmup-steps", type=int, help="linear learning-rate warm-up steps (default 0)")
    p.add_argument("--final-lr-ratio", type=float, help="learning rate at the end as a fraction of --lr, for cosine/linear (default 1)")
    p.add_argument("--ema-decay", type=float, help=f"EMA decay; 0 disables the EMA (default {DEFAULTS['ema_decay']})")
    p.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=None,
                   help="ramp the EMA decay up as min(decay, (1+n)/(10+n)) (default off)")
    p.add_argument("--grad-clip", type=float, help="max gradient norm; 0 disables clipping (default 1.0 as TinyFusion; DiT pre-training used none)")
    p.add_argument("--precision", choices=PRECISIONS, help="auto = bf16 autocast on GPUs that support it, else fp32; bf16 also "
                   "runs on CPUs, fast where they have native bf16 (default auto)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="run the training forward through torch.compile: slower start, faster steps (default off)")
    p.add_argument("--class-dropout", type=float, help="label-dropout probability for guidance training (default: the model config's)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 1000; the last step is always saved)")
    p.add_argument("--keep-checkpoints", type=int, help="how many recent checkpoints to keep; 0 keeps all (default 2)")
    p.add_argument("--log-every", type=int, help="steps between metrics.jsonl lines (default 10)")
    p.add_argument("--seed", type=int, help="seed of data order, noise, timesteps and label drops (default 0)")
    p.add_argument("--num-workers", type=int, help="data-loading worker processes per training process (default 0)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--inpaint", nargs="?", const="mixed", metavar="MASKS",
                   help="fine-tune an inpainting variant (the masked image and the mask as extra input channels, new "
                   "weights zero-initialised so it starts as the model) with masks drawn per image: "
                   f"{SPEC_HELP}; --inpaint alone = mixed")
    p.add_argument("--stop-after", type=int, default=None, help="end this invocation after N more steps (resumable), e.g. to time-slice a long run")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_overwrite_option(p)
    add_model_options(p)
    p.set_defaults(run=run)


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Command line > recipe > defaults, with the model overrides merged."""
    recipe: dict[str, Any] = {}
    if args.recipe is not None:
        if not args.recipe.exists():
            raise FileNotFoundError(f"recipe not found: {args.recipe}")
        try:
            recipe = json.loads(args.recipe.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{args.recipe}: not valid JSON ({err})") from None
        unknown = sorted(set(recipe) - set(DEFAULTS) - {"description"})
        if unknown:
            raise ValueError(f"{args.recipe}: unknown settings {unknown}; known: {sorted(DEFAULTS)}")
    settings = {}
    for key, default in DEFAULTS.items():
        given = getattr(args, key, None)
        settings[key] = given if given is not None else recipe.get(key, default)
    overrides = dict(settings["model_overrides"])
    for item in args.set_fields:
        if "=" not in item:
            raise ValueError(f"--set takes FIELD=VALUE, got {item!r}")
        field, value = item.split("=", 1)
        overrides[field.strip()] = _parse_value(value)
    settings["model_overrides"] = overrides
    for key in ("model", "data", "steps"):
        if settings[key] is None:
            raise ValueError(f"--{key} is required (on the command line or in the recipe)")
    if settings["warmup_steps"] and settings["warmup_steps"] >= settings["steps"]:
        log(f"warning: --warmup-steps {settings['warmup_steps']} is not shorter than the run ({plural(settings['steps'], 'step')}): "
            "the learning rate never reaches --lr")
    return settings


def _make_job(model, s: dict[str, Any], objective, conditioning):
    """(the model to train, its job): the plain objective, or inpainting with --inpaint (a
    model not yet an inpainting variant is wrapped, its new weights at zero)."""
    if s["inpaint"] is None:
        if inpaint_layer(model) is not None:
            raise ValueError("this is an inpainting model: pass --inpaint MASKS to fine-tune it (--inpaint alone: mixed masks)")
        return model, DenoisingJob(model, objective, s["class_dropout"], conditioning)
    from ..train.inpainting import InpaintingJob

    masks = parse_masks(s["inpaint"], backbone(model).spec.input_size)
    if inpaint_layer(model) is None:
        model = InpaintModel(model)
    inpaint_layer(model).trained_masks = masks.text  # the record of what it was fine-tuned on last
    return model, InpaintingJob(model, objective, masks, s["class_dropout"], conditioning)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def run(args: argparse.Namespace) -> int:
    s = resolve_settings(args)
    claim_out(args.out, KIND, args.overwrite, write=False)  # refused before any work
    check_data_option(s["data"])
    dist = setup_distributed(s["device"])
    try:
        named_size = is_named_size(s["model"])  # "DiT-S/2", or with overrides "DiT-S/2:depth=6"
        if named_size:
            # --objective/--space/--num-heads describe files; for a named size they are overrides.
            named = {"objective": args.objective, "space": args.space, "num_heads": args.num_heads}
            base, in_name = parse_named_size(s["model"])
            overrides = {**{k: v for k, v in named.items() if v is not None}, **in_name, **s["model_overrides"]}
            torch.manual_seed(s["seed"])  # the same command gives the same initial weights
            model = build_model(base, **overrides)
        else:
            if s["model_overrides"]:
                raise ValueError("--set/model_overrides apply to named sizes only, not to a model loaded from a file")
            model = open_model(s["model"], args)
        dataset = open_training_data(s["data"])
        check_data_fits(model, dataset, s["data"], named_size=named_size)
        loop = {name: s[name] for name in _LOOP_FIELDS}
        config = LoopConfig(steps=s["steps"], global_batch_size=s["batch_size"],
                            **{**loop, "ema_decay": s["ema_decay"] or None, "ema_warmup": bool(s["ema_warmup"]),
                               "grad_clip": s["grad_clip"] or None})
        spec = backbone(model).spec
        model, job = _make_job(model, s, make_objective(spec), data_conditioning(model, dataset))
        check_resume(args.out, s, model, ("inpaint",))  # the architecture decides (a model named two ways is the same)
        trainer = Trainer(config, args.out, dist=dist, progress=not args.quiet)  # refuses options the device cannot use
        if dist.is_main:
            claim_out(args.out, KIND, args.overwrite)
            write_run_record(args.out, s, model, dist.world_size)
            log(f"training {spec.name or s['model']} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters) "
                f"on {s['data']} ({len(dataset)} items) for {s['steps']} steps on {dist.world_size} x {dist.device}")
        started = time.perf_counter()
        result = trainer.fit(job, dataset, stop_after=args.stop_after)
        if dist.is_main:
            seconds = time.perf_counter() - started
            if result.steps >= config.steps:
                final = save_model(model, args.out / "model", ema=result.ema, extra={"trained_steps": result.steps},
                                   overwrite=args.overwrite)
                log(f"done: {plural(result.steps, 'step')} ({result.skipped_steps} skipped) in {duration(seconds)}; model saved to {final}")
            else:
                log(f"stopped at step {result.steps} of {config.steps} after {duration(seconds)}; run the same command to continue")
        barrier()
    finally:
        teardown_distributed()
    return 0
