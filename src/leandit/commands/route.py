"""`leandit route`: token routing with learned compression ratios (DiffCR), fine-tuned to a target."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from .router_training import add_common_options, check_common, router_lr, run_router_training

SUMMARY = "route tokens past blocks with learned ratios per block and timestep region (DiffCR) and fine-tune to a target"
KIND = {"command": "route"}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "route",
        help=SUMMARY,
        description="Give every block of MODEL a token router (Linear(hidden, 1) on the block input) and a kept ratio per "
        "timestep region, starting at ratio 1 (exactly the dense model). Each block runs on its top-k tokens only "
        "(k = ceil(ratio x tokens), kept in spatial order; the others skip the block), and the ratio is learned by running "
        "the block at the two nearest ratio bins and mixing the outputs. Routers, ratios and weights are fine-tuned together "
        "on the model's own loss (optionally distilled from the dense model) plus w * (mean kept ratio - (1 - target))^2. "
        "Writes <out>/model with the ratios frozen to a static schedule (block x region -> k): it samples, evaluates and "
        "benchmarks like any other model, each block running once at its scheduled k. Shows progress, resumes when run "
        "again, runs on many GPUs with torchrun.",
    )
    p.add_argument("model", help="the model to route: a model folder, checkpoint file or digits-teacher (a depth-pruned "
                   "model, or a DyDiT model made with --no-tokens, works too; its record keeps every step)")
    p.add_argument("--target", type=float, required=True,
                   help="the fraction of the computation to remove, in (0, 1): 0.3 = the blocks run on 70 %% of the tokens "
                   "on average (with --budget macs: 30 %% fewer MACs)")
    method = p.add_argument_group("routing (defaults: the paper's)")
    method.add_argument("--budget", choices=("ratio", "macs"), default="ratio",
                        help="ratio = the paper's MSE of the mean kept ratio; macs = of the MAC ratio, attention's quadratic "
                        "cost and the parts no router controls counted (default ratio)")
    method.add_argument("--budget-weight", type=float, default=1.0, help="weight w of the budget loss (default 1)")
    method.add_argument("--regions", type=int, default=4,
                        help="timestep regions with their own ratios, stratified over each batch (default 4 of 250 steps; "
                        "1 = one ratio per block)")
    method.add_argument("--bins", type=int, default=10, help="ratio bins 1/bins .. 1 (default 10: 0.1, 0.2, .., 1.0)")
    method.add_argument("--scale", choices=("mlp", "update"), default="mlp",
                        help="what the router's score multiplies: the MLP branch (the paper's) or the block's whole update "
                        "(default mlp)")
    method.add_argument("--multiplier", choices=("straight-through", "score"), default="straight-through",
                        help="straight-through: the factor is 1 + s - stop_gradient(s), so ratio 1 is the dense model; "
                        "score: the sigmoid score itself (Mixture-of-Depths; changes the model at the start) "
                        "(default straight-through)")
    method.add_argument("--skipped-kv", action="store_true",
                        help="the kept tokens' attention also reads the skipped tokens' keys and values (leandit DiT/SiT "
                        "blocks; default: attention among the kept tokens only, the paper's)")
    method.add_argument("--inpaint", metavar="MASKS", default=None,
                        help="an inpainting model is fine-tuned on inpainting: the masks its steps draw (default: the masks it "
                        "was trained with, else mixed; see `leandit train --inpaint`)")
    add_common_options(p, "optimisation steps")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..compress.routing import RoutedModel, RoutingSettings
    from ..compress.routing.job import RouteJob, RoutingTraining

    check_common(args, KIND)
    training = RoutingTraining(target=args.target, budget=args.budget, budget_weight=args.budget_weight,
                               router_lr=router_lr(args))
    settings = RoutingSettings(regions=args.regions, bins=args.bins, scale=args.scale, multiplier=args.multiplier,
                               skipped_kv=args.skipped_kv)

    def is_wrapped(source) -> bool:
        if not isinstance(source, RoutedModel):
            return False
        if asdict(source.settings) != asdict(settings):
            raise ValueError(f"{args.model} is already routed with other settings ({asdict(source.settings)}); fine-tune it "
                             "with its own settings or start from the model it was made from")
        source.set_schedule(None)  # train its ratios again; the new schedule is frozen at the end
        return True

    def make_job(model, recovery, **kwargs):
        return RouteJob(model, training, recovery, masks=_masks(args, model), **kwargs)

    def describe(model, job) -> str:
        floor = RouteJob.reachable(model, training.budget)
        what = "MACs" if training.budget == "macs" else "block tokens"
        return (f"routing {args.model} ({model.depth} blocks, {model.num_tokens} tokens, {settings.regions} timestep "
                f"region{'s' if settings.regions > 1 else ''}) toward {args.target:.0%} fewer {what} (up to {1 - floor:.0%} "
                "reachable)")

    def record() -> dict[str, Any]:
        return {"method": "diffcr", "source": str(args.model), "target": training.target, "settings": asdict(settings),
                "training": asdict(training), "inpaint": args.inpaint}

    return run_router_training(args, kind=KIND, wrap=lambda source: RoutedModel(source, settings), is_wrapped=is_wrapped,
                               make_job=make_job, record=record, resume_keys=("target", "settings", "training", "inpaint"),
                               describe=describe)


def _masks(args: argparse.Namespace, model) -> Any:
    """The inpainting masks of an inpainting model's steps; None for any other model."""
    from ..backbones import backbone
    from ..models.inpaint import inpaint_layer, parse_masks

    layer = inpaint_layer(model)
    if layer is None:
        if args.inpaint is not None:
            raise ValueError(f"--inpaint: {args.model} is not an inpainting model (make one with `leandit train --inpaint`)")
        return None
    return parse_masks(args.inpaint or layer.trained_masks or "mixed", backbone(model).spec.input_size)


__all__ = ["SUMMARY", "add_parser", "run"]
