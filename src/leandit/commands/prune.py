"""`leandit prune`: choose which blocks to keep (learnably or by a baseline) and export the
shallower model as a normal model folder."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from ..compress.depth import (
    METHODS,
    RANDOM_PICKS,
    SCORE_METHODS,
    LearnablePruningJob,
    LearnableSettings,
    explicit,
    global_scheme,
    make_calibration_set,
    oracle,
    parse_scheme,
    plain_state_dict,
    random_method,
    score_method,
)
from ..compress.depth.learnable import RECOVERABILITY, SKIP_DROPPED, auto_ema_decay
from ..compress.depth.lists import check_scheme_lists, describe_crossing
from ..data import open_training_data
from ..evaluate.plots import plot_decisions
from ..models.blocks import depth_of, list_ranges
from ..compress.depth.export import pruned_model
from ..files import write_text_atomically
from ..models.io import save_model
from ..train import Trainer, setup_distributed, teardown_distributed
from ..train.distributed import resolve_device
from ..train.distributed import barrier
from ..train.loop import METRICS_FILE
from .common import (
    check_resume,
    write_run_record,
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
)

DECISION_FILE = "decision.json"
METHOD_HELP = (
    "how to choose the blocks: "
    "learnable = train a keep/drop gate per block together with a LoRA (or full) update and keep the blocks that recover "
    "best (TinyFusion; needs --steps); "
    "shortgpt = drop the blocks that turn their input least (block influence 1 - cos(input, output)); "
    "fluxlite = drop the blocks that change their input least (mean squared change); "
    "sensitivity = drop the blocks whose removal alone raises the calibration loss least; "
    "oracle = keep evenly spaced blocks, the first and last included (no data); "
    "random = a random mask of the scheme (see --random-pick); "
    "indices = keep exactly the blocks of --indices"
)
DECISION_PLOT = "decisions.png"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "prune",
        help="depth-prune a model: learnable (TinyFusion) or a baseline; writes the pruned model folder",
        description="Choose which blocks of MODEL to keep and write <out>/model, a normal model folder with fewer "
        "blocks and a compression.json that records the source, the kept indices, the method and its decisions. "
        "Learnable runs train with the one training loop: they show progress, resume when the same command is run "
        "again, and run on many GPUs with torchrun.",
    )
    p.add_argument("model", help="the model to prune: a model folder or a DiT/SiT checkpoint file")
    p.add_argument("--method", choices=METHODS, required=True, help=METHOD_HELP)
    p.add_argument("--out", type=Path, required=True, help="output folder: model/, decision.json (+ checkpoints/, metrics.jsonl, decisions.png when learnable)")
    p.add_argument("--scheme", help="local N:M groups, e.g. 1:2, 2:4, 7:14 or mixed 1:2,2:4,1:2 (learnable needs one; baselines choose the best N of every group)")
    p.add_argument("--keep", type=int, help="baselines: keep this many blocks anywhere in the depth (one global group); instead of --scheme")
    p.add_argument("--indices", help="--method indices: the blocks to keep, e.g. 0,2,4,6")
    p.add_argument("--data", default="digits", help="'digits' or a folder of latent shards: training data of learnable runs and the calibration set of baselines (default digits)")

    cal = p.add_argument_group("calibration (shortgpt, fluxlite, sensitivity, random min/median-loss)")
    cal.add_argument("--calibration-size", type=int, default=256, help="images in the fixed calibration set (default 256)")
    cal.add_argument("--calibration-seed", type=int, default=0, help="seed of the calibration noise (default 0)")
    cal.add_argument("--eval-batch-size", type=int, default=64, help="batch size of calibration forward passes (default 64)")
    cal.add_argument("--random-pick", choices=RANDOM_PICKS, default="first", help="--method random: the first mask drawn, or the min-/median-loss one of --random-samples (default first)")
    cal.add_argument("--random-samples", type=int, default=None, help="masks drawn for min-/median-loss random (default 100)")

    d = LearnableSettings()  # the defaults live in the settings dataclass; the options show them
    learn = p.add_argument_group("learnable pruning (defaults are the TinyFusion paper's)")
    learn.add_argument("--steps", type=int, help="optimisation steps of the learnable run (required for it; the paper ran ~10k at batch 128)")
    learn.add_argument("--batch-size", type=int, default=128, help="global batch size (default 128)")
    learn.add_argument("--recoverability", choices=RECOVERABILITY, default=d.recoverability, help=f"weight update trained with the gates: lora, full or frozen (default {d.recoverability})")
    learn.add_argument("--lora-rank", type=int, default=d.lora_rank, help=f"LoRA rank (default {d.lora_rank})")
    learn.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help=f"LoRA alpha (default {d.lora_alpha:g})")
    learn.add_argument("--lr", type=float, default=1e-4, help="learning rate of LoRA or full weights (default 1e-4)")
    learn.add_argument("--logits-lr", type=float, default=d.logits_lr, help=f"learning rate of the gate logits (default {d.logits_lr:g})")
    learn.add_argument("--temperature", type=float, nargs=2, default=(d.temperature_start, d.temperature_end), metavar=("START", "END"),
                       help=f"Gumbel-softmax temperature, linear over the run (default {d.temperature_start:g} {d.temperature_end:g})")
    learn.add_argument("--logit-scale", type=float, default=d.logit_scale, help=f"logits are multiplied by this before the softmax (default {d.logit_scale:g})")
    learn.add_argument("--logit-init", type=float, default=d.logit_init, help=f"initial value of every logit (default {d.logit_init:g}: uniform)")
    learn.add_argument("--ema-decay", default="auto",
                       help="EMA decay of logits and weights; the decision uses the EMA logits; 0 disables. auto = 1 - 10 / steps "
                       "within [0.9, 0.999]: the paper's 0.999 at its ~10k steps, and for shorter runs an EMA that still "
                       "averages the last tenth of the run instead of remembering the start (default auto)")
    learn.add_argument("--skip-dropped-backward", choices=SKIP_DROPPED, default=d.skip_dropped_backward,
                       help="run each block without a graph for the images whose gate is 0, so the backward skips them "
                       "(same gradients, less work): auto = on for CPUs, off for GPUs, where the per-block split was "
                       "measured slower (default auto)")
    learn.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm; 0 disables (default 1.0)")
    learn.add_argument("--class-dropout", type=float, default=None, help="label-dropout probability (default: the model config's)")
    learn.add_argument("--merge-delta", action="store_true", help="export the kept blocks with the learned LoRA delta (or fine-tuned weights) instead of the original weights")
    add_run_options(learn, checkpoint_every=500)

    p.add_argument("--seed", type=int, default=0, help="seed of random masks, noise, timesteps, label drops and gate samples (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_overwrite_option(p)
    add_model_options(p)
    # The learnable-only options and their defaults, to tell which ones a baseline run was given.
    p.set_defaults(run=run, learnable_defaults={a.dest: a.default for a in learn._group_actions})


def _scheme_for(args, depth: int):
    if args.scheme and args.keep is not None:
        raise ValueError("give --scheme or --keep, not both")
    if args.scheme:
        return parse_scheme(args.scheme, depth)
    if args.keep is not None:
        if not 1 <= args.keep < depth:
            raise ValueError(f"--keep {args.keep}: the model has {depth} blocks; keep between 1 and {depth - 1} of them")
        if args.method == "learnable":
            raise ValueError("learnable pruning needs a local --scheme such as 1:2 or 2:4 (not --keep)")
        return global_scheme(depth, args.keep)
    if args.method == "indices":
        return None
    if args.method == "learnable":
        raise ValueError("learnable pruning needs a local --scheme such as 1:2 or 2:4")
    raise ValueError(f"--method {args.method} needs --scheme (e.g. 1:2) or --keep K")


def _check_options(args) -> None:
    """Options that do not apply to the chosen method are errors, not silently ignored."""
    if args.indices and args.method != "indices":
        raise ValueError("--indices applies to --method indices only")
    if args.method != "learnable":
        given = [name for name, default in args.learnable_defaults.items() if getattr(args, name) != default]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} applies to --method learnable only")
    elif args.merge_delta and args.recoverability == "frozen":
        raise ValueError("--merge-delta has nothing to merge with --recoverability frozen (the weights do not train)")
    if args.random_pick != "first" and args.method != "random":
        raise ValueError("--random-pick applies to --method random only")
    if args.random_samples is not None and not (args.method == "random" and args.random_pick != "first"):
        raise ValueError("--random-samples applies to --method random with --random-pick min-loss or median-loss")
    if args.random_samples is not None and args.random_samples < 1:
        raise ValueError(f"--random-samples must be at least 1, got {args.random_samples}")


def _kind(args) -> dict:
    return {"command": "prune", "method": args.method}


def run(args: argparse.Namespace) -> int:
    _check_options(args)
    check_data_option(args.data)
    claim_out(args.out, _kind(args), args.overwrite, write=False)  # refused before any work
    if args.method == "learnable":
        return _run_learnable(args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"--method {args.method} runs in one process: start it without torchrun")
    source = open_model(args.model, args)
    depth = depth_of(source)
    scheme = _scheme_for(args, depth)
    _warn_crossing(source, scheme)
    progress = not args.quiet
    started = time.perf_counter()
    if args.method == "indices":
        if not args.indices:
            raise ValueError("--method indices needs --indices, e.g. --indices 0,2,4,6")
        try:
            indices = [int(i) for i in args.indices.split(",") if i.strip()]
        except ValueError:
            raise ValueError(f"--indices takes comma-separated block numbers, got {args.indices!r}") from None
        decision = explicit(indices, depth, scheme)
    elif args.method == "oracle":
        decision = oracle(scheme)
    elif args.method == "random" and args.random_pick == "first":
        decision = random_method(source, None, scheme, "first", seed=args.seed)
    else:
        device = resolve_device(args.device)
        source.to(device)
        if args.calibration_size < 1 or args.eval_batch_size < 1:
            raise ValueError("--calibration-size and --eval-batch-size must be at least 1")
        dataset = open_training_data(args.data)
        check_data_fits(source, dataset, args.data)
        calibration = make_calibration_set(source, dataset, args.calibration_size, args.calibration_seed)
        if args.method in SCORE_METHODS:
            decision = score_method(args.method, source, calibration, scheme, args.eval_batch_size, progress)
        else:
            decision = random_method(source, calibration, scheme, args.random_pick, args.random_samples or 100, args.seed,
                                     args.eval_batch_size, progress)
        decision.details["calibration"] = {"data": args.data, "size": args.calibration_size, "seed": args.calibration_seed}
        source.to("cpu")
    decision.details.setdefault("seconds", round(time.perf_counter() - started, 2))
    _finish(args, source, decision)
    return 0


def _run_learnable(args: argparse.Namespace) -> int:
    if args.steps is None:
        raise ValueError("learnable pruning needs --steps (the paper ran about one epoch: ~10k steps at batch 128)")
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    dist = setup_distributed(args.device)
    try:
        source = open_model(args.model, args)
        scheme = _scheme_for(args, depth_of(source))  # parsed once, before any work
        check_scheme_lists(source, scheme)  # the run may end on any choice the scheme allows
        if dist.is_main:
            _warn_crossing(source, scheme)
        settings = LearnableSettings(
            scheme=args.scheme,
            temperature_start=args.temperature[0],
            temperature_end=args.temperature[1],
            logit_scale=args.logit_scale,
            logit_init=args.logit_init,
            logits_lr=args.logits_lr,
            recoverability=args.recoverability,
            lora_rank=args.lora_rank,
            lora_alpha=args.lora_alpha,
            class_dropout=args.class_dropout,
            skip_dropped_backward=args.skip_dropped_backward,
        )
        dataset = open_training_data(args.data)
        check_data_fits(source, dataset, args.data)
        record = {"command": "prune", "method": "learnable", "model": str(args.model), **dataclasses.asdict(settings)}
        check_resume(args.out, record, source, ("scheme", "recoverability", "lora_rank"))  # what the checkpoints' shapes follow
        torch.manual_seed(args.seed)  # LoRA initialisation
        job = LearnablePruningJob(copy.deepcopy(source), settings, scheme, data_conditioning(source, dataset))
        config = loop_config(args, weight_decay=0.0,
                             ema_decay=parse_ema_decay(args.ema_decay, lambda: auto_ema_decay(args.steps)))
        trainer = Trainer(config, args.out, dist=dist, progress=not args.quiet)  # refuses options the device cannot use
        if dist.is_main:
            weights = f"{job.trainable_weights:,} {settings.recoverability} weights" if job.trainable_weights else "frozen weights"
            log(f"learnable {job.scheme} pruning of {args.model} ({depth_of(source)} -> {job.scheme.num_kept} blocks, "
                f"{job.gates.num_candidates} logits, {weights}) for {args.steps} steps on {dist.world_size} x {dist.device}")
        if dist.is_main:
            claim_out(args.out, _kind(args), args.overwrite)
            write_run_record(args.out, record, source, dist.world_size)
        barrier()
        started = time.perf_counter()
        result = trainer.fit(job, dataset, stop_after=args.stop_after)
        if result.steps < config.steps:
            if dist.is_main:
                log(f"stopped at step {result.steps} of {config.steps}; run the same command to continue")
            return 0
        if dist.is_main:
            ema = result.ema
            decision = job.decision(ema, result.steps)
            decision.details["data"] = args.data
            decision.details["seconds_this_invocation"] = round(time.perf_counter() - started, 2)
            weights, label = None, "original"
            if args.merge_delta:
                trained = (ema if ema is not None else job.module).backbone
                weights = plain_state_dict(trained, merge=True)
                label = "lora-merged" if settings.recoverability == "lora" else f"{settings.recoverability}-trained"
            plot_decisions(args.out / METRICS_FILE, args.out / DECISION_PLOT, kept=decision.kept,
                           title=f"Learnable {job.scheme} pruning of {Path(args.model).name}: keep probability per block")
            _finish(args, source, decision, weights, label)
        barrier()
    finally:
        teardown_distributed()
    return 0


def _warn_crossing(source, scheme) -> None:
    """Say so when a group of the scheme spans two block lists (MAR's encoder and decoder)."""
    if scheme is None or len(list_ranges(source)) < 2:
        return
    warning = describe_crossing(scheme, list_ranges(source))
    if warning:
        log(f"warning: {warning}")


def _finish(args, source, decision, weights=None, label="original") -> None:
    model = pruned_model(source, decision, weights, label, source_name=str(args.model))  # may refuse: nothing written yet
    if args.method != "learnable":  # a learnable run claimed it before training
        claim_out(args.out, _kind(args), args.overwrite)
    folder = save_model(model, args.out / "model", overwrite=args.overwrite)
    # The model's own new record, once more beside the run for a quick look.
    write_text_atomically(args.out / DECISION_FILE, json.dumps(model.compression[-1], indent=2) + "\n")
    summary = f"{args.method}: kept {len(decision.kept)} of {decision.depth} blocks {decision.kept}"
    if decision.groups and "confidence" in decision.groups[0]:
        summary += f", lowest group confidence {min(g['confidence'] for g in decision.groups):.3f}"
    log(summary)
    log(f"pruned model written to {folder}")

