"""What `leandit dynamic` and `leandit route` share: a method that wraps a model with routers
and fine-tunes routers and weights together on the recovery loss mix plus its own budget.
The options of the loss mix and the loop, the routers' learning rate, and the run itself
(teacher, data, trainer, resume check, record, final model folder) are written once here."""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import __version__
from ..backbones import backbone
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


def add_common_options(p: argparse.ArgumentParser, steps_help: str) -> None:
    """--out, --data, the loss mix, the loop and the model options."""
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoints/, metrics.jsonl, run.json and the final model/")
    p.add_argument("--data", default="digits", help="'digits' or a folder of latent shards from extract-features (default digits)")
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

    loop = p.add_argument_group("training")
    loop.add_argument("--steps", type=int, required=True, help=steps_help)
    loop.add_argument("--batch-size", type=int, default=256, help="global batch size (default 256)")
    loop.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of the weights, constant (default 1e-4)")
    loop.add_argument("--router-lr", default="auto",
                      help="AdamW learning rate of the routers; auto = the larger of --lr and 10 / --steps (at most 0.1), so "
                      "that what the routers start from can move in a short run; a paper-length run gets --lr (default auto)")
    loop.add_argument("--ema-decay", default="auto", help="EMA decay; 0 disables. auto = 1 - 10 / steps within [0.9, 0.9999] "
                      "(0.9999 for long runs; default auto)")
    loop.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm; 0 disables (default 1.0)")
    add_run_options(loop, checkpoint_every=1000)
    loop.add_argument("--seed", type=int, default=0, help="seed of data order, noise, timesteps and routers (default 0)")
    loop.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    loop.add_argument("--quiet", action="store_true", help="no progress bar")
    add_overwrite_option(p)
    add_model_options(p)


def router_lr(args: argparse.Namespace) -> float:
    if args.router_lr == "auto":
        return max(args.lr, min(0.1, 10.0 / args.steps))
    try:
        return float(args.router_lr)
    except ValueError:
        raise ValueError(f"--router-lr takes a number or 'auto', got {args.router_lr!r}") from None


def check_common(args: argparse.Namespace, kind: dict[str, str]) -> None:
    """Refusals that need no model: before any work, with nothing written."""
    claim_out(args.out, kind, args.overwrite, write=False)
    check_data_option(args.data)
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")


def run_router_training(
    args: argparse.Namespace,
    *,
    kind: dict[str, str],
    wrap: Callable[[nn.Module], nn.Module],
    is_wrapped: Callable[[nn.Module], bool],
    make_job: Callable[..., Any],
    record: Callable[[], dict[str, Any]],
    resume_keys: tuple[str, ...],
    describe: Callable[[nn.Module, Any], str],
) -> int:
    """Open MODEL (and the teacher), wrap it with `wrap` (seeded: the same command makes the same
    routers), train `make_job(model, recovery, teacher=, teacher_layers=, teacher_dtype=,
    conditioning=)` on the loop, and save <out>/model with `record()` (read once the model is wrapped) appended to its history
    (a resume must match the first run's `resume_keys` of it)."""
    recovery = settings_from(args)
    if args.teacher and not recovery.needs_teacher:
        raise ValueError(f"--mix {args.mix} uses no teacher: drop --teacher, or choose --mix kd or masked-kd")
    dist = setup_distributed(args.device)
    try:
        source = open_model(args.model, args)
        refuse_masked(source, kind["command"], args.model)
        teacher = None
        if recovery.needs_teacher:
            teacher = open_model(args.teacher, args) if args.teacher else open_model(args.model, args)
            if getattr(teacher, "varies_with_timestep", False):
                raise ValueError("the teacher must be a dense model: pass --teacher with the model this one was made from")
        torch.manual_seed(args.seed)
        model = source if is_wrapped(source) else wrap(source)
        model.compression = list(getattr(source, "compression", []))
        dataset = open_training_data(args.data)
        check_data_fits(model, dataset, args.data)
        config = loop_config(
            args, weight_decay=0.0, lr_schedule="constant",
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
        job = make_job(model, recovery, teacher=teacher, teacher_layers=layers,
                       teacher_dtype=torch.bfloat16 if bf16 and teacher is not None else None,
                       conditioning=data_conditioning(model, dataset))
        record = {**record(), **_loop_record(args, recovery, config)}
        check_resume(args.out, {**kind, **record}, model, resume_keys)
        if dist.is_main:
            claim_out(args.out, kind, args.overwrite)
            write_run_record(args.out, {**kind, **record}, model, dist.world_size)
            log(describe(model, job) + f" for {plural(args.steps, 'step')} on {dist.world_size} x {dist.device}"
                + (f", distilled with --mix {args.mix}" if teacher is not None else ""))
        started = time.perf_counter()
        result = trainer.fit(job, dataset, stop_after=args.stop_after)
        if dist.is_main:
            seconds = time.perf_counter() - started
            if result.steps >= config.steps:
                record.update(skipped_steps=result.skipped_steps, date=time.strftime("%Y-%m-%d %H:%M:%S"))
                final = save_model(model, args.out / "model", ema=result.ema, compression=[*model.compression, record],
                                   overwrite=args.overwrite, extra={"trained_steps": result.steps})
                log(f"done: {plural(result.steps, 'step')} ({result.skipped_steps} skipped) in {duration(seconds)}; "
                    f"model saved to {final}")
            else:
                log(f"stopped at step {result.steps} of {config.steps} after {duration(seconds)}; run the same command to continue")
        barrier()
    finally:
        teardown_distributed()
    return 0


# Why each router method cannot take a MAR (the masked objective): its routers follow the
# timestep of the whole image, and MAR's blocks see none.
_NOT_FOR_MAR = {
    "dynamic": "DyDiT's routers choose each block's width and tokens from the image's timestep",
    "route": "token routing chooses which image tokens a block processes per timestep region",
}


def refuse_masked(model: nn.Module, command: str, name: str) -> None:
    """A one-line refusal of a MAR, before any work (the routers would fail deep inside)."""
    if backbone(model).spec.objective != "masked":
        return
    why = _NOT_FOR_MAR.get(command, "its routers follow the image's timestep")
    raise ValueError(f"leandit {command} does not apply to MAR ({name}): {why}, but MAR's encoder and decoder blocks see no "
                     "timestep (only its head's token rows carry one); depth-prune it with `leandit prune` instead")


def _loop_record(args: argparse.Namespace, recovery, config) -> dict[str, Any]:
    return {
        "loss": {"mix": args.mix, "teacher": args.teacher or (str(args.model) if recovery.needs_teacher else None),
                 **{k: v for k, v in asdict(recovery).items() if k != "class_dropout"}},
        "steps": config.steps,
        "batch_size": config.global_batch_size,
        "lr": config.lr,
        "ema_decay": config.ema_decay,
        "data": args.data,
        "leandit": __version__,
    }
