"""`leandit dynamic`: make a model dynamic (DyDiT) and fine-tune it toward a MAC target."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..compress.recovery import MIXES, teacher_layers
from ..data import open_training_data
from ..models import save_model
from ..models.blocks import depth_of
from ..train import Trainer, setup_distributed, teardown_distributed
from ..train.distributed import barrier
from ..train.ema import ema_decay_for_steps
from .common import (
    add_model_options,
    add_overwrite_option,
    add_run_options,
    check_data_fits,
    check_data_option,
    check_resume,
    claim_out,
    data_conditioning,
    duration,
    log,
    loop_config,
    open_model,
    parse_ema_decay,
    plural,
    write_run_record,
)
from .finetune import settings_from

SUMMARY = "make a model dynamic (DyDiT: timestep-wise width, per-token MLP skipping) and fine-tune it to a MAC target"
KIND = {"command": "dynamic"}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "dynamic",
        help=SUMMARY,
        description="Wrap MODEL's blocks with DyDiT routers (a head router and an MLP-group router on the timestep "
        "embedding per block, and a token router before each MLP), starting exactly at the dense model, and fine-tune "
        "routers and weights together on the model's own loss (optionally distilled from the dense model) plus "
        "w * (batch mean MACs ratio - target)^2, the target annealed from 1. Writes <out>/model, a model folder that "
        "samples, evaluates and benchmarks like any other; its inference slices the weights per timestep and runs the "
        "MLP on kept tokens only. Shows progress, resumes when run again, runs on many GPUs with torchrun.",
    )
    p.add_argument("model", help="the model to make dynamic: a model folder, checkpoint file or digits-teacher "
                   "(a depth-pruned model works too; its record keeps both steps)")
    p.add_argument("--target", type=float, required=True,
                   help="MACs to keep, as a fraction of the dense model's (the paper's lambda: 0.3-0.7), in (0, 1]")
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoints/, metrics.jsonl, run.json and the final model/")
    p.add_argument("--data", default="digits", help="'digits' or a folder of latent shards from extract-features (default digits)")

    method = p.add_argument_group("DyDiT (defaults: the paper's)")
    method.add_argument("--no-width", action="store_true", help="keep every head and MLP channel (token routers only)")
    method.add_argument("--no-tokens", action="store_true", help="send every token through the MLP (width routers only)")
    method.add_argument("--tau", type=float, default=5.0, help="Gumbel-sigmoid temperature in training (default 5)")
    method.add_argument("--flops-weight", type=float, default=1.0, help="weight w of the MAC loss (default 1, the paper's)")
    method.add_argument("--target-warmup", type=int, default=None,
                        help="steps over which the target anneals from 1 to --target (default: a tenth of --steps, at most 5000)")
    method.add_argument("--dense-loss-steps", type=int, default=0,
                        help="first-stage steps that add the unmasked model's own loss (the paper: 30k of 150k; default 0)")
    method.add_argument("--router-lr", default="auto",
                        help="AdamW learning rate of the routers; auto = the larger of --lr and 10 / --steps (at most 0.1), so that the "
                        "routers' biases (15 logits from skipping anything at the start) can move in a short run; "
                        "a paper-length run (150k steps) gets --lr (default auto)")
    method.add_argument("--regions", type=int, default=4, help="timestep regions stratified over each batch (default 4 of 250 steps)")
    method.add_argument("--reorder", choices=("none", "magnitude"), default="none",
                        help="reorder each block's heads and MLP channels by weight magnitude first, so that the always-on "
                        "head 0 and group 0 are the strongest (exact; see benchmarks/dydit_digits.md; default none)")

    loss = p.add_argument_group("loss mix (default: the model's own loss only, as the paper)")
    loss.add_argument("--mix", choices=MIXES, default="plain",
                      help="plain = the diffusion loss only; kd / masked-kd distil from the dense model (or --teacher) as "
                      "`leandit finetune` does (default plain)")
    loss.add_argument("--teacher", help="the dense teacher for kd/masked-kd (default: MODEL itself, frozen)")
    loss.add_argument("--kd-weight", type=float, help="weight of logits KD (overrides the mix)")
    loss.add_argument("--diffusion-weight", type=float, help="weight of the model's own loss (overrides the mix)")
    loss.add_argument("--repkd-weight", type=float, help="RepKD weight at the start, linear to 0 (overrides the mix)")
    loss.add_argument("--repkd-k", help="RepKD outlier threshold in standard deviations, or 'none' (overrides the mix)")
    loss.add_argument("--class-dropout", type=float, help="label-dropout probability (default: the model config's)")

    loop = p.add_argument_group("training (defaults: the paper's)")
    loop.add_argument("--steps", type=int, required=True, help="optimisation steps (the paper: 150k-200k at batch 256 for DiT-XL)")
    loop.add_argument("--batch-size", type=int, default=256, help="global batch size (default 256)")
    loop.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate, constant (default 1e-4)")
    loop.add_argument("--ema-decay", default="auto", help="EMA decay; 0 disables. auto = 1 - 10 / steps within [0.9, 0.9999] "
                      "(the paper's 0.9999 for long runs; default auto)")
    loop.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm; 0 disables (default 1.0)")
    add_run_options(loop, checkpoint_every=1000)
    loop.add_argument("--seed", type=int, default=0, help="seed of data order, noise, timesteps and router noise (default 0)")
    loop.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    loop.add_argument("--quiet", action="store_true", help="no progress bar")
    add_overwrite_option(p)
    add_model_options(p)
    p.set_defaults(run=run)


def _target_warmup(args: argparse.Namespace) -> int:
    if args.target_warmup is None:
        return min(5000, args.steps // 10)
    if args.target_warmup > args.steps:
        raise ValueError(f"--target-warmup {args.target_warmup} is longer than the run (--steps {args.steps}): "
                         "the target would never be reached; use at most --steps")
    return args.target_warmup


def _router_lr(args: argparse.Namespace) -> float:
    if args.router_lr == "auto":
        return max(args.lr, min(0.1, 10.0 / args.steps))
    try:
        return float(args.router_lr)
    except ValueError:
        raise ValueError(f"--router-lr takes a number or 'auto', got {args.router_lr!r}") from None


def run(args: argparse.Namespace) -> int:
    from ..compress.dynamic import DynamicModel, DynamicSettings
    from ..compress.dynamic.importance import reorder_by_importance
    from ..compress.dynamic.job import DynamicJob, DynamicTraining

    claim_out(args.out, KIND, args.overwrite, write=False)  # refused before any work
    check_data_option(args.data)
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    if args.dense_loss_steps > args.steps:
        raise ValueError(f"--dense-loss-steps {args.dense_loss_steps} is longer than the run (--steps {args.steps})")
    training = DynamicTraining(target=args.target, flops_weight=args.flops_weight, target_warmup=_target_warmup(args),
                               dense_loss_steps=args.dense_loss_steps, regions=args.regions, router_lr=_router_lr(args))
    settings = DynamicSettings(width=not args.no_width, tokens=not args.no_tokens, tau=args.tau)
    recovery = settings_from(args)
    if args.teacher and not recovery.needs_teacher:
        raise ValueError(f"--mix {args.mix} uses no teacher: drop --teacher, or choose --mix kd or masked-kd")
    dist = setup_distributed(args.device)
    try:
        source = open_model(args.model, args)
        already = isinstance(source, DynamicModel)
        if already and (asdict_settings(source.settings) != asdict_settings(settings)):
            raise ValueError(f"{args.model} is already dynamic ({source.settings.label}, tau {source.settings.tau:g}); "
                             "fine-tune it with its own settings or start from the dense model")
        if already and args.reorder != "none":
            raise ValueError("--reorder applies to a dense model: this one is already dynamic")
        teacher = None
        if recovery.needs_teacher:
            teacher = open_model(args.teacher, args) if args.teacher else open_model(args.model, args)
            if isinstance(teacher, DynamicModel):
                raise ValueError("the teacher must be a dense model: pass --teacher with the model this one was made from")
        orders = reorder_by_importance(source) if args.reorder == "magnitude" else None
        # The token routers' first layer starts random (torch's default init): seeded, so that the
        # same command gives the same routers (and a resumed run the uninterrupted run's weights).
        torch.manual_seed(args.seed)
        model = source if already else DynamicModel(source, settings)
        model.compression = list(getattr(source, "compression", []))
        dataset = open_training_data(args.data)
        check_data_fits(model, dataset, args.data)
        config = loop_config(
            args,
            weight_decay=0.0,
            lr_schedule="constant",
            ema_decay=parse_ema_decay(args.ema_decay, lambda: ema_decay_for_steps(args.steps, maximum=0.9999)),
        )
        trainer = Trainer(config, args.out, dist=dist, progress=not args.quiet)
        layers = None
        if recovery.repkd_weight > 0:  # each block distils from the teacher block it stands for
            if depth_of(teacher) == depth_of(model):
                layers = list(range(depth_of(model)))
            else:
                layers = teacher_layers(model.compression, getattr(teacher, "compression", []), depth_of(model),
                                        depth_of(teacher), "segment")
        bf16 = trainer.uses_bf16() and dist.device.type == "cuda"
        job = DynamicJob(model, training, recovery, teacher=teacher, teacher_layers=layers,
                         teacher_dtype=torch.bfloat16 if bf16 and teacher is not None else None,
                         conditioning=data_conditioning(model, dataset))
        record = _record(args, training, settings, recovery, config, orders)
        check_resume(args.out, {"command": "dynamic", **record}, model, ("target", "settings", "reorder", "training"))
        if dist.is_main:
            claim_out(args.out, KIND, args.overwrite)
            write_run_record(args.out, {"command": "dynamic", **record}, model, dist.world_size)
            log(f"making {args.model} ({depth_of(model)} blocks) dynamic ({settings.label}) toward {args.target:g} of its MACs "
                f"(at least {model.macs.minimum_ratio():.3f} reachable) for {plural(args.steps, 'step')} on "
                f"{dist.world_size} x {dist.device}" + (f", distilled with --mix {args.mix}" if teacher is not None else ""))
        started = time.perf_counter()
        result = trainer.fit(job, dataset, stop_after=args.stop_after)
        if dist.is_main:
            seconds = time.perf_counter() - started
            if result.steps >= config.steps:
                record.update(skipped_steps=result.skipped_steps, date=time.strftime("%Y-%m-%d %H:%M:%S"))
                final = save_model(model, args.out / "model", ema=result.ema, compression=[*model.compression, record],
                                   overwrite=args.overwrite, extra={"trained_steps": result.steps})
                log(f"done: {plural(result.steps, 'step')} ({result.skipped_steps} skipped) in {duration(seconds)}; "
                    f"dynamic model saved to {final}")
            else:
                log(f"stopped at step {result.steps} of {config.steps} after {duration(seconds)}; run the same command to continue")
        barrier()
    finally:
        teardown_distributed()
    return 0


def asdict_settings(settings) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(settings)


def _record(args, training, settings, recovery, config, orders) -> dict[str, Any]:
    """What compression.json remembers of this step (earlier steps, e.g. depth pruning, stay)."""
    from dataclasses import asdict

    return {
        "method": "dydit",
        "source": str(args.model),
        "target": training.target,
        "settings": asdict(settings),
        "training": asdict(training),
        "reorder": args.reorder,
        "reordered": orders is not None,
        "loss": {"mix": args.mix, "teacher": args.teacher or (str(args.model) if recovery.needs_teacher else None),
                 **{k: v for k, v in asdict(recovery).items() if k != "class_dropout"}},
        "steps": config.steps,
        "batch_size": config.global_batch_size,
        "lr": config.lr,
        "ema_decay": config.ema_decay,
        "data": args.data,
        "leandit": __version__,
    }


__all__ = ["SUMMARY", "add_parser", "run"]
