"""`leandit finetune`: recover a pruned model by fine-tuning it with logits KD, (masked) RepKD
and its own diffusion loss from a frozen teacher (TinyFusion's recovery)."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..compress.recovery import ALIGNMENT_RULES, MIXES, RecoveryJob, RecoverySettings, parse_teacher_layers, teacher_layers
from ..data import open_training_data
from ..models import save_model
from ..models.blocks import depth_of
from ..train import LoopConfig, Trainer, setup_distributed, teardown_distributed
from ..train.distributed import barrier
from ..train.ema import ema_decay_for_steps
from .common import (
    check_resume,
    duration,
    plural,
    check_data_option,
    add_model_options,
    add_overwrite_option,
    add_run_options,
    claim_out,
    check_data_fits,
    data_conditioning,
    log,
    loop_config,
    open_model,
    parse_ema_decay,
    write_run_record,
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="recover a pruned model: fine-tune it with logits KD and masked RepKD from its teacher",
        description="Fine-tune STUDENT (usually a pruned model folder) with the loss mix "
        "kd-weight * logits KD + diffusion-weight * its own loss + repkd-weight * (masked) RepKD, the RepKD weight "
        "decaying linearly to 0 over the run. Each student block is aligned with the teacher block at the end of the "
        "part of the teacher it replaces, read from the compression.json histories (the teacher may be the original "
        "model or any model in the student's pruning chain). Writes <out>/model with the recovery appended to its "
        "compression history. Shows progress, resumes when run again, runs on many GPUs with torchrun.",
    )
    p.add_argument("student", help="the model to fine-tune: a (pruned) model folder or checkpoint file")
    p.add_argument("--teacher", help="the frozen teacher (a model the student was pruned from); needed unless --mix plain")
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoints/, metrics.jsonl, run.json and the final model/")
    p.add_argument("--data", default="digits", help="'digits' or a folder of latent shards from extract-features (default digits)")

    loss = p.add_argument_group("loss mix (defaults: TinyFusion's masked KD)")
    loss.add_argument("--mix", choices=MIXES, default="masked-kd",
                      help="named mix: masked-kd = 0.9 KD + 0.1 diffusion + 1e-2 masked RepKD (k=2); kd = 0.9 KD + 0.1 diffusion; "
                      "repkd = masked-kd without the mask; plain = diffusion loss only, no teacher (default masked-kd)")
    loss.add_argument("--kd-weight", type=float, help="weight of logits KD (overrides the mix)")
    loss.add_argument("--diffusion-weight", type=float, help="weight of the model's own diffusion/flow loss (overrides the mix)")
    loss.add_argument("--repkd-weight", type=float, help="RepKD weight at the start, linear to 0 at the end (overrides the mix)")
    loss.add_argument("--repkd-k", help="drop activations beyond k standard deviations from the RepKD loss; 'none' = no mask "
                      "(overrides the mix; 2 or 4 work, see `leandit analyze activations`)")
    loss.add_argument("--align", choices=ALIGNMENT_RULES, default="segment",
                      help="how student blocks map to teacher blocks, from compression.json: segment = the end of the stretch "
                      "of removed blocks each kept block replaces within its group (the group's end when a group keeps one "
                      "block, as in the paper); group-end = always the group's last block; groups are cut where a block "
                      "list ends (MAR: encoder blocks align with encoder blocks, decoder with decoder) (default segment)")
    loss.add_argument("--teacher-layers", help="explicit alignment, one teacher block per student block (e.g. 1,3,5); "
                      "default: derived from compression.json")
    loss.add_argument("--class-dropout", type=float, help="label-dropout probability, shared by student and teacher (default: the student config's)")

    loop = p.add_argument_group("training (defaults: TinyFusion's recovery)")
    loop.add_argument("--steps", type=int, required=True, help="optimisation steps (the paper: 100k-500k at batch 256 on ImageNet)")
    loop.add_argument("--batch-size", type=int, default=256, help="global batch size (default 256)")
    loop.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate, weight decay 0 (default 2e-4)")
    loop.add_argument("--final-lr-ratio", type=float, default=0.5, help="cosine decay to this fraction of --lr (default 0.5)")
    loop.add_argument("--ema-decay", default="auto", help="EMA decay; 0 disables. auto = 1 - 10 / steps within [0.9, 0.9999]: "
                      "the paper's 0.9999 from 100k steps on, and an EMA that follows the run for short ones (default auto)")
    loop.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm; 0 disables (default 1.0)")
    add_run_options(loop, checkpoint_every=1000, precision_help=" (and a bf16 teacher)")
    loop.add_argument("--keep-checkpoints", type=int, default=2, help="recent checkpoints to keep; 0 keeps all (default 2)")
    loop.add_argument("--seed", type=int, default=0, help="seed of data order, noise, timesteps and label drops (default 0)")
    loop.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    loop.add_argument("--quiet", action="store_true", help="no progress bar")
    add_overwrite_option(p)
    add_model_options(p)
    p.set_defaults(run=run)


def settings_from(args: argparse.Namespace) -> RecoverySettings:
    k: Any = None
    if args.repkd_k is not None:
        if args.repkd_k.lower() in ("none", "inf", "off"):
            k = math.inf  # not None: an explicit "no mask" must override the mix's k
        else:
            try:
                k = float(args.repkd_k)
            except ValueError:
                raise ValueError(f"--repkd-k takes a number or 'none', got {args.repkd_k!r}") from None
    settings = RecoverySettings.from_mix(
        args.mix,
        kd_weight=args.kd_weight,
        diffusion_weight=args.diffusion_weight,
        repkd_weight=args.repkd_weight,
        repkd_k=k,
        class_dropout=args.class_dropout,
    )
    if settings.repkd_k is not None and math.isinf(settings.repkd_k):
        settings.repkd_k = None
    return settings


KIND = {"command": "finetune"}


def run(args: argparse.Namespace) -> int:
    claim_out(args.out, KIND, args.overwrite, write=False)  # refused before any work
    check_data_option(args.data)
    settings = settings_from(args)
    if settings.needs_teacher and not args.teacher:
        raise ValueError(f"--mix {args.mix} distils from a teacher: pass --teacher (the model the student was pruned from), or use --mix plain")
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    if args.teacher and not settings.needs_teacher:
        raise ValueError(f"--mix {args.mix} uses no teacher: drop --teacher, or give a mix that distils (e.g. --mix masked-kd)")
    if settings.repkd_weight == 0:
        for option, given in (("--teacher-layers", args.teacher_layers), ("--repkd-k", args.repkd_k), ("--align", args.align != "segment")):
            if given:
                raise ValueError(f"{option} applies only when RepKD is on (--repkd-weight > 0)")
    dist = setup_distributed(args.device)
    try:
        student = open_model(args.student, args)
        teacher = open_model(args.teacher, args) if settings.needs_teacher else None
        layers = None
        if settings.repkd_weight > 0:
            if args.teacher_layers:
                layers = parse_teacher_layers(args.teacher_layers, depth_of(student), depth_of(teacher))
            else:
                layers = teacher_layers(student.compression, teacher.compression, depth_of(student), depth_of(teacher), args.align)
        dataset = open_training_data(args.data)
        check_data_fits(student, dataset, args.data)
        config = loop_config(
            args,
            weight_decay=0.0,
            lr_schedule="cosine",
            final_lr_ratio=args.final_lr_ratio,
            ema_decay=parse_ema_decay(args.ema_decay, lambda: ema_decay_for_steps(args.steps, maximum=0.9999)),
            keep_checkpoints=args.keep_checkpoints,
        )
        trainer = Trainer(config, args.out, dist=dist, progress=not args.quiet)
        bf16 = trainer.uses_bf16()
        job = RecoveryJob(student, teacher, settings, layers,
                          teacher_dtype=torch.bfloat16 if bf16 and teacher is not None else None,
                          conditioning=data_conditioning(student, dataset))
        record = _recovery_record(args, settings, config, teacher, layers)
        check_resume(args.out, {"command": "finetune", **record}, student, ("teacher_layers",))  # paths may be spelt two ways
        if dist.is_main:
            claim_out(args.out, KIND, args.overwrite)
            write_run_record(args.out, {"command": "finetune", **record}, student, dist.world_size)
            what = ", ".join(f"{w:g} {name}" for name, w in (("KD", settings.kd_weight), ("diffusion", settings.diffusion_weight),
                                                          ("RepKD", settings.repkd_weight)) if w)
            log(f"recovering {args.student} ({depth_of(student)} blocks) with {what}"
                + (f" from {args.teacher} ({depth_of(teacher)} blocks)" if teacher is not None else "")
                + (f", student block j aligned with teacher block {layers}" if layers else "")
                + f" for {args.steps} steps on {dist.world_size} x {dist.device}")
        started = time.perf_counter()
        result = trainer.fit(job, dataset, stop_after=args.stop_after)
        if dist.is_main:
            seconds = time.perf_counter() - started
            if result.steps >= config.steps:
                record.update(skipped_steps=result.skipped_steps, date=time.strftime("%Y-%m-%d %H:%M:%S"))
                history = [*getattr(student, "compression", []), record]
                final = save_model(student, args.out / "model", ema=result.ema, compression=history, overwrite=args.overwrite,
                                   extra={"trained_steps": result.steps})
                log(f"done: {plural(result.steps, 'step')} ({result.skipped_steps} skipped) in {duration(seconds)}; recovered model saved to {final}")
            else:
                log(f"stopped at step {result.steps} of {config.steps} after {duration(seconds)}; run the same command to continue")
        barrier()
    finally:
        teardown_distributed()
    return 0


def _recovery_record(args, settings: RecoverySettings, config: LoopConfig, teacher, layers) -> dict[str, Any]:
    """What compression.json remembers of this recovery (pruning records stay the chain)."""
    return {
        "method": "recovery",
        "source": str(args.student),
        "teacher": str(args.teacher) if teacher is not None else None,
        "teacher_depth": depth_of(teacher) if teacher is not None else None,
        "teacher_layers": layers,
        "alignment": (args.align if not args.teacher_layers else "explicit") if layers else None,
        "loss": {
            "mix": args.mix,
            "kd_weight": settings.kd_weight,
            "diffusion_weight": settings.diffusion_weight,
            "repkd_weight": settings.repkd_weight,
            "repkd_k": settings.repkd_k,
        },
        "steps": config.steps,
        "batch_size": config.global_batch_size,
        "lr": config.lr,
        "final_lr_ratio": config.final_lr_ratio,
        "ema_decay": config.ema_decay,
        "data": args.data,
        "leandit": __version__,
    }


__all__ = ["add_parser", "run", "settings_from"]
