"""`leandit dynamic`: make a model dynamic (DyDiT) and fine-tune it toward a MAC target."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from .router_training import add_common_options, check_common, router_lr, run_router_training

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
    method = p.add_argument_group("DyDiT (defaults: the paper's)")
    method.add_argument("--no-width", action="store_true", help="keep every head and MLP channel (token routers only)")
    method.add_argument("--no-tokens", action="store_true", help="send every token through the MLP (width routers only)")
    method.add_argument("--tau", type=float, default=5.0, help="Gumbel-sigmoid temperature in training (default 5)")
    method.add_argument("--flops-weight", type=float, default=1.0, help="weight w of the MAC loss (default 1, the paper's)")
    method.add_argument("--target-warmup", type=int, default=None,
                        help="steps over which the target anneals from 1 to --target (default: a tenth of --steps, at most 5000)")
    method.add_argument("--dense-loss-steps", type=int, default=0,
                        help="first-stage steps that add the unmasked model's own loss (the paper: 30k of 150k; default 0)")
    method.add_argument("--regions", type=int, default=4, help="timestep regions stratified over each batch (default 4 of 250 steps)")
    method.add_argument("--reorder", choices=("none", "magnitude"), default="none",
                        help="reorder each block's heads and MLP channels by weight magnitude first, so that the always-on "
                        "head 0 and group 0 are the strongest (exact; see benchmarks/dydit_digits.md; default none)")

    add_common_options(p, "optimisation steps (the paper: 150k-200k at batch 256 for DiT-XL)")
    p.set_defaults(run=run)


def _target_warmup(args: argparse.Namespace) -> int:
    if args.target_warmup is None:
        return min(5000, args.steps // 10)
    if args.target_warmup > args.steps:
        raise ValueError(f"--target-warmup {args.target_warmup} is longer than the run (--steps {args.steps}): "
                         "the target would never be reached; use at most --steps")
    return args.target_warmup


def run(args: argparse.Namespace) -> int:
    from ..compress.dynamic import DynamicModel, DynamicSettings
    from ..compress.dynamic.importance import reorder_by_importance
    from ..compress.dynamic.job import DynamicJob, DynamicTraining

    check_common(args, KIND)
    if args.dense_loss_steps > args.steps:
        raise ValueError(f"--dense-loss-steps {args.dense_loss_steps} is longer than the run (--steps {args.steps})")
    training = DynamicTraining(target=args.target, flops_weight=args.flops_weight, target_warmup=_target_warmup(args),
                               dense_loss_steps=args.dense_loss_steps, regions=args.regions, router_lr=router_lr(args))
    settings = DynamicSettings(width=not args.no_width, tokens=not args.no_tokens, tau=args.tau)
    reordered: list[bool] = []

    def is_wrapped(source) -> bool:
        if not isinstance(source, DynamicModel):
            return False
        if asdict(source.settings) != asdict(settings):
            raise ValueError(f"{args.model} is already dynamic ({source.settings.label}, tau {source.settings.tau:g}); "
                             "fine-tune it with its own settings or start from the dense model")
        if args.reorder != "none":
            raise ValueError("--reorder applies to a dense model: this one is already dynamic")
        return True

    def wrap(source):
        if args.reorder == "magnitude":
            reordered.append(reorder_by_importance(source) is not None)
        return DynamicModel(source, settings)

    def make_job(model, recovery, **kwargs):
        return DynamicJob(model, training, recovery, **kwargs)

    def describe(model, job) -> str:
        return (f"making {args.model} ({model.depth} blocks) dynamic ({settings.label}) toward {args.target:g} of its MACs "
                f"(at least {model.macs.minimum_ratio():.3f} reachable)")

    def record() -> dict[str, Any]:  # read after wrapping: whether reordering happened
        return {"method": "dydit", "source": str(args.model), "target": training.target, "settings": asdict(settings),
                "training": asdict(training), "reorder": args.reorder, "reordered": bool(reordered and reordered[0])}

    return run_router_training(args, kind=KIND, wrap=wrap, is_wrapped=is_wrapped, make_job=make_job, record=record,
                               resume_keys=("target", "settings", "reorder", "training"), describe=describe)


__all__ = ["SUMMARY", "add_parser", "run"]
