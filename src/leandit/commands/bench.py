"""`leandit bench`: parameters, FLOPs, latency, throughput, peak memory and speed-up of models
measured side by side in one run. DiT/SiT models are timed per sampling step; MAR models by
their whole generation loop per image, split into the transformer blocks, the head and the rest."""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
from pathlib import Path

import torch

from ..compress.step_cache import CacheSettings, StepCache
from ..diffusion import make_objective
from ..evaluate.model_specs import open_spec
from ..evaluate.plots import plot_speedup_curve
from ..files import write_text_atomically
from ..evaluate.speed import (LoopSpeedResult, SpeedResult, compression_variants, is_masked, measure_generation_speed, measure_speed,
                              process_peak_memory_mib, varies_with_timestep)
from ..backbones import backbone
from ..devices import check_compile, check_cuda_graphs, resolve_precision, warn_slow_bf16
from ..train.distributed import resolve_device
from .common import add_model_options, log, plural, si


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="speed and cost of models side by side: parameters, FLOPs, latency, images/s, peak memory, speed-up",
        description="Measure every MODEL at the same batch size in one run: parameters, FLOPs of one sampling step "
        "(attention included; with guidance a step runs 2 x batch), median latency per sampling step over interleaved "
        "rounds after warm-up, images per second for a full sampling run, peak memory of a step, and the speed-up "
        "over the first model. MODEL is a model folder, a checkpoint file, or a named size with random weights and "
        "optional overrides, e.g. DiT-XL/2 DiT-XL/2:depth=14 DiT-XL/2:depth=7. MAR models (compared with MAR models "
        "only) are timed by their whole generation loop per image (encoder, decoder and head over every iteration, "
        "guidance included), with the time in the transformer blocks, in the head and the rest, and the speed-up of "
        "the whole loop and of the block part, e.g. MAR-L MAR-L:encoder_depth=8,decoder_depth=8.",
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="models to compare; speed-ups are over the first (with --curve: one model)")
    p.add_argument("--batch-size", type=int, default=2, help="images per sampling step (default 2)")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="guidance scale; 1 = no guidance (default 1.5: a step runs 2 x batch)")
    p.add_argument("--sampling-steps", type=int, default=None,
                   help="steps of a full sampling run, for images/s (default 250, DiT's DDPM); MAR: the unmasking "
                   "iterations of the timed loop (default 64, or one per token when fewer)")
    p.add_argument("--head-steps", default=None, help="MAR: the head's DDPM steps per token: a count, 'ddimN' or counts "
                   "per section (default: the model's, 100 in MAR)")
    p.add_argument("--trajectory", type=int, metavar="STEPS",
                   help="time whole sampling runs of STEPS steps (--sampler; from fixed noise) and report the mean per step; "
                   "FLOPs are then counted from what each model ran. Needed for dynamic (DyDiT) models, whose cost depends "
                   "on the timestep and the image (default: single steps)")
    p.add_argument("--sampler", default=None,
                   help="--trajectory: the sampler of the runs, any of `leandit sample`'s for the model (default: ddim for "
                   "diffusion models, heun for flow models)")
    p.add_argument("--cache-interval", default=None, metavar="N[,N...]",
                   help="--trajectory: step caching every N model calls (1 = none), one value for every model or one per "
                   "model, so `bench A A --trajectory 50 --cache-interval 1,2` puts A beside A cached")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per model first (default 3; MAR: 1 whole loop)")
    p.add_argument("--rounds", type=int, default=None,
                   help="timed rounds; each times every model once, in turn (default 10; MAR: 3 whole loops)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="auto = bf16 autocast on GPUs, fp32 on CPU (default auto)")
    p.add_argument("--compile", action="store_true",
                   help="time the models compiled by torch.compile (the warm-up absorbs the compilation; FLOPs and memory are the eager models')")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="GPU only: compile with CUDA graphs (torch.compile mode reduce-overhead): each static-shape step replays as one graph")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement (on CPU it runs each model once more in a fresh process)")
    p.add_argument("--curve", type=Path, metavar="PNG",
                   help="instead: the speed-up curve of depth and width pruning of the one MODEL (TinyFusion Figure 4) as this PNG, "
                   "with the table of every point")
    p.add_argument("--keep", default="0.75,0.5,0.25", help="--curve: kept fractions of blocks / of heads and MLP channels (default 0.75,0.5,0.25)")
    p.add_argument("--out", type=Path, help="also write the table as markdown to this file (with the machine and command)")
    p.add_argument("--json", type=Path, help="also write the rows as JSON to this file")
    add_model_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    for option in ("sampling_steps", "rounds"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            raise ValueError(f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}")
    if args.warmup is not None and args.warmup < 0:
        raise ValueError(f"--warmup must be 0 or more, got {args.warmup}")
    if args.trajectory is not None and args.trajectory < 1:
        raise ValueError(f"--trajectory must be at least 1 step, got {args.trajectory}")
    if args.sampler is not None and args.trajectory is None:
        raise ValueError("--sampler applies to whole sampling runs: add --trajectory STEPS")
    if args.curve is not None and args.curve.suffix.lower() != ".png":
        raise ValueError(f"--curve {args.curve}: the curve is written as a PNG; give a file name ending in .png")
    for option, path in (("--curve", args.curve), ("--out", args.out), ("--json", args.json)):
        if path is not None and path.is_dir():
            raise ValueError(f"{option} {path} is a folder: give a file name")
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    warn_slow_bf16(precision, device)
    if args.compile or args.cuda_graphs:
        check_compile(device)
    if args.cuda_graphs:
        check_cuda_graphs(device)
    load_options = {"weights": args.weights, "num_heads": args.num_heads, "objective": args.objective, "space": args.space,
                    "trust_checkpoint": args.trust_checkpoint}
    if args.curve:
        return _run_curve(args, device, precision, load_options)
    models = [(spec, open_spec(spec, **load_options)) for spec in args.models]
    masked = [is_masked(m) for _, m in models]
    if any(masked):
        if not all(masked):
            mar = ", ".join(spec for (spec, _), m in zip(models, masked) if m)
            raise ValueError(f"{mar}: MAR models are timed by their whole generation loop per image, DiT/SiT models per "
                             "sampling step: bench them in separate runs")
        return _run_mar(args, models, device, precision, load_options)
    if args.head_steps is not None:
        raise ValueError("--head-steps applies to MAR models only")
    args.sampling_steps = args.sampling_steps or 250
    args.warmup = 3 if args.warmup is None else args.warmup
    args.rounds = args.rounds or 10
    models = _with_caches(models, args.cache_interval, args.trajectory)
    if args.trajectory is None and any(varies_with_timestep(m) for _, m in models):
        raise ValueError("a dynamic (DyDiT) model's cost depends on the timestep: pass --trajectory STEPS "
                         "(e.g. --trajectory 50) to time whole sampling runs")
    for spec, model in models:  # before any output
        objective = make_objective(backbone(model).spec)
        if args.sampler is not None and args.sampler not in objective.samplers:
            raise ValueError(f"{spec}: sampler {args.sampler!r} does not fit a {objective.kind} model; choose one of {objective.samplers}")
    log(f"measuring {plural(len(models), 'model')} at batch {args.batch_size} on {device} ({precision}), "
        f"{plural(args.warmup, 'warm-up step')}, {plural(args.rounds, 'interleaved round')}")
    results = measure_speed(models, args.batch_size, cfg_scale=args.cfg_scale, sampling_steps=args.sampling_steps,
                            warmup=args.warmup, rounds=args.rounds, device=device, precision=precision,
                            trajectory_steps=args.trajectory, compile=args.compile, cuda_graphs=args.cuda_graphs,
                            sampler=args.sampler)
    if device.type == "cpu" and not args.no_memory:
        for result, spec in zip(results, args.models):
            result.peak_memory_mib = process_peak_memory_mib(spec, args.batch_size, args.cfg_scale, precision, load_options)
    table = format_table(results, args.batch_size, args.cfg_scale, args.sampling_steps, args.trajectory, args.sampler)
    return write_results(args, results, table, device, precision)



def write_results(args: argparse.Namespace, results: list, table: str, device: torch.device, precision: str) -> int:
    """Print the table and write --out (markdown with the machine) and --json (the rows)."""
    print(table)
    machine = describe_machine(device, precision, args)
    if args.out:
        write_text_atomically(args.out, f"Machine: {machine}.\n\n{table}\n")
        log(f"wrote {args.out}")
    if args.json:
        write_text_atomically(args.json, json.dumps({"machine": machine, "batch_size": args.batch_size, "cfg_scale": args.cfg_scale,
                                                     "rows": [r.to_dict() for r in results]}, indent=2) + "\n")
    return 0

def _with_caches(models: list, intervals: str | None, trajectory: int | None) -> list:
    """The models, each wrapped in its step cache of --cache-interval (1: left as it is)."""
    if intervals is None:
        return models
    if trajectory is None:
        raise ValueError("--cache-interval applies to whole sampling runs: add --trajectory STEPS")
    try:
        values = [int(v) for v in intervals.split(",")]
    except ValueError:
        raise ValueError(f"--cache-interval takes whole numbers, one or one per model; got {intervals!r}") from None
    if len(values) == 1:
        values *= len(models)
    if len(values) != len(models):
        raise ValueError(f"--cache-interval has {len(values)} values for {len(models)} models: give one, or one per model")
    wrapped = []
    for (spec, model), interval in zip(models, values):
        settings = CacheSettings(interval=interval)  # refuses 0
        if interval == 1:
            wrapped.append((spec, model))
        else:
            # The same model listed twice must not share one cache's hooks.
            inner = copy.deepcopy(model) if any(m is model for _, m in wrapped) else model
            wrapped.append((f"{spec} (cache every {interval})", StepCache(inner, settings)))
    return wrapped


def format_table(results: list[SpeedResult], batch_size: int, cfg_scale: float, sampling_steps: int,
                 trajectory: int | None = None, sampler: str | None = None) -> str:
    lines = [
        f"| model | blocks | parameters | FLOPs / step | latency / step (ms) | images/s ({sampling_steps} steps) | peak memory (MiB) | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        memory = f"{r.peak_memory_mib:,.0f}" if r.peak_memory_mib is not None else "–"
        lines.append(f"| {r.name} | {r.depth} | {si(r.parameters)} | {si(r.flops_per_step)} | "
                     f"{r.latency_ms:,.1f} ± {r.latency_spread_ms:,.1f} | {r.images_per_s:.3g} | {memory} | "
                     f"**{r.speedup:.2f}x** |")
    guided = "with guidance (a step = one forward of 2 x batch)" if cfg_scale != 1.0 else "without guidance"
    lines += ["", f"Batch {batch_size}, {guided}; latency = median over interleaved rounds (± half the interquartile "
              "range); speed-up = latency of the first model / latency of this one, from the same run."]
    if trajectory:
        how = f"{sampler}" if sampler else "the default sampler, DDIM / Heun"
        lines[-1] += (f" Each round timed a whole {trajectory}-step sampling run per model ({how}, from fixed noise): "
                      "latency and FLOPs are means per step over it, FLOPs counted from the decisions each model made.")
    return "\n".join(lines)


def _run_mar(args: argparse.Namespace, models: list, device, precision: str, load_options: dict) -> int:
    """MAR rows: whole generation loops per image, and where their time goes."""
    if args.compile or args.cuda_graphs:
        raise ValueError(f"{'--compile' if args.compile else '--cuda-graphs'} applies to DiT/SiT/diffusers sampling steps; "
                         "a MAR generation loop (masks, orders, the head's own loop) is timed eager: leave it out")
    if args.cache_interval is not None or args.sampler is not None:
        raise ValueError(f"{'--cache-interval' if args.cache_interval is not None else '--sampler'} applies to DiT/SiT/diffusers "
                         "trajectories; a MAR model runs its own unmasking loop")
    if args.trajectory is not None or args.curve is not None:
        raise ValueError(f"{'--trajectory' if args.trajectory is not None else '--curve'} applies to DiT/SiT models; a MAR "
                         "model is always timed over whole generation loops (compare pruned folders or "
                         "MAR-L:encoder_depth=...,decoder_depth=... side by side)")
    warmup = 1 if args.warmup is None else args.warmup
    rounds = args.rounds or 3
    log(f"measuring the generation loop of {plural(len(models), 'MAR model')} at batch {args.batch_size} on {device} "
        f"({precision}), {plural(warmup, 'warm-up loop')}, {plural(rounds, 'interleaved round')}")
    results = measure_generation_speed(models, args.batch_size, cfg_scale=args.cfg_scale, num_iter=args.sampling_steps,
                                       head_steps=args.head_steps, warmup=warmup, rounds=rounds, device=device,
                                       precision=precision, progress=log)
    if device.type == "cpu" and not args.no_memory:
        loop = {"num_iter": results[0].num_iter, "head_steps": args.head_steps}
        for result, spec in zip(results, args.models):
            result.peak_memory_mib = process_peak_memory_mib(spec, args.batch_size, args.cfg_scale, precision, load_options, loop)
    table = format_loop_table(results, args.batch_size, args.cfg_scale)
    return write_results(args, results, table, device, precision)


def format_loop_table(results: list[LoopSpeedResult], batch_size: int, cfg_scale: float) -> str:
    """The MAR table: the whole loop per image, its parts (time and share), the speed-ups."""
    def part(seconds: float, total: float) -> str:
        return f"{seconds:,.3g} s ({seconds / total:.0%})"

    lines = [
        "| model | blocks (enc + dec) | parameters | FLOPs / image | s / image | in blocks | in head | rest | images/s "
        "| peak memory (MiB) | speed-up, loop | speed-up, blocks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        memory = f"{r.peak_memory_mib:,.0f}" if r.peak_memory_mib is not None else "–"
        total = r.seconds_per_image
        lines.append(f"| {r.name} | {r.encoder_depth} + {r.decoder_depth} | {si(r.parameters)} | {si(r.flops_per_image)} | "
                     f"{total:,.3g} ± {r.spread_s:,.2g} | {part(r.blocks_s, total)} | {part(r.head_s, total)} | "
                     f"{part(r.rest_s, total)} | {r.images_per_s:.3g} | {memory} | **{r.speedup:.2f}x** | "
                     f"**{r.block_speedup:.2f}x** |")
    first = results[0]
    if cfg_scale == 1.0:
        guided = "without guidance"
    elif first.guided:
        guided = f"with guidance {cfg_scale:g} (the context and the head run on 2 x batch)"
    else:
        guided = f"without guidance (--cfg-scale {cfg_scale:g}, but the model has no null class)"
    lines += ["", f"Whole generation loop: {first.num_iter} iterations, {first.head_steps} head DDPM steps per token, batch "
              f"{batch_size}, {guided}. s / image = median over interleaved rounds (± half the interquartile range) of the "
              "loop's time / batch; in blocks = encoder and decoder blocks, in head = the head's calls, rest = the "
              "remainder (embeddings, masks, the DDPM arithmetic and noise), timed inside the same loops (the parts add "
              "up to the total); speed-ups over the first model, of the loop and of the block part."]
    return "\n".join(lines)


def short_name(spec: str) -> str:
    """A model's name for a title: a folder's or file's own name, a named size as it is."""
    path = Path(str(spec).rstrip("/"))
    return path.name if path.exists() else str(spec)


def describe_machine(device: torch.device, precision: str, args: argparse.Namespace | None = None) -> str:
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, {plural(torch.get_num_threads(), 'thread')}"
    how = precision
    if args is not None and (getattr(args, "compile", False) or getattr(args, "cuda_graphs", False)):
        how += ", torch.compile" + (" with CUDA graphs" if args.cuda_graphs else "")
    return f"{where}, {how}, torch {torch.__version__}"


def _run_curve(args: argparse.Namespace, device, precision: str, load_options: dict) -> int:
    args.sampling_steps = args.sampling_steps or 250
    args.warmup = 3 if args.warmup is None else args.warmup
    args.rounds = args.rounds or 10
    if len(args.models) != 1:
        raise ValueError("--curve measures one model against its depth- and width-pruned versions: give exactly one MODEL")
    try:
        keep = [float(f) for f in args.keep.split(",") if f.strip()]
    except ValueError:
        raise ValueError(f"--keep takes comma-separated fractions, e.g. 0.75,0.5; got {args.keep!r}") from None
    variants = compression_variants(open_spec(args.models[0], **load_options), keep)
    log(f"measuring {plural(len(variants), 'variant')} of {args.models[0]} at batch {args.batch_size} on {device} ({precision})")
    results = measure_speed([(name, model) for _, name, _, model in variants], args.batch_size, cfg_scale=args.cfg_scale,
                            sampling_steps=args.sampling_steps, warmup=args.warmup, rounds=args.rounds, device=device,
                            precision=precision, compile=args.compile, cuda_graphs=args.cuda_graphs)
    full_flops = results[0].flops_per_step
    rows = [{"kind": kind, "keep": f, **r.to_dict(), "compute_ratio": full_flops / r.flops_per_step}
            for (kind, _, f, _), r in zip(variants, results)]
    lines = ["| variant | kept | compute ratio (linear limit) | latency / step (ms) | speed-up | share of the limit |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['name']} | {row['keep']:g} | {row['compute_ratio']:.2f}x | {row['latency_ms']:,.1f} ± {row['latency_spread_ms']:,.1f} "
                     f"| **{row['speedup']:.2f}x** | {row['speedup'] / row['compute_ratio'] * 100:.0f} % |")
    table = "\n".join(lines)
    print(table)
    title = f"{short_name(args.models[0])}: speed-up of depth and width pruning ({device.type}, {precision}, batch {args.batch_size})"
    plot_speedup_curve(rows, args.curve, title=title)
    log(f"wrote {args.curve}")
    machine = describe_machine(device, precision, args)
    if args.out:
        write_text_atomically(args.out, f"Machine: {machine}.\n\n{table}\n")
    if args.json:
        write_text_atomically(args.json, json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    return 0

