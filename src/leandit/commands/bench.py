"""`leandit bench`: parameters, FLOPs, latency, throughput, peak memory and speed-up of models
measured side by side in one run."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

from ..evaluate.model_specs import open_spec
from ..evaluate.plots import plot_speedup_curve
from ..files import write_text_atomically
from ..evaluate.speed import SpeedResult, compression_variants, measure_speed, process_peak_memory_mib, varies_with_timestep
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
        "optional overrides, e.g. DiT-XL/2 DiT-XL/2:depth=14 DiT-XL/2:depth=7.",
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="models to compare; speed-ups are over the first (with --curve: one model)")
    p.add_argument("--batch-size", type=int, default=2, help="images per sampling step (default 2)")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="guidance scale; 1 = no guidance (default 1.5: a step runs 2 x batch)")
    p.add_argument("--sampling-steps", type=int, default=250, help="steps of a full sampling run, for images/s (default 250, DiT's DDPM)")
    p.add_argument("--trajectory", type=int, metavar="STEPS",
                   help="time whole sampling runs of STEPS steps (DDIM for diffusion models, Euler for flow models, from "
                   "fixed noise) and report the mean per step; FLOPs are then counted from what each model ran. Needed "
                   "for dynamic (DyDiT) models, whose cost depends on the timestep and the image (default: single steps)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model first (default 3)")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds; each times every model once, in turn (default 10)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="auto = bf16 autocast on GPUs, fp32 on CPU (default auto)")
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
    if args.trajectory is not None and args.trajectory < 1:
        raise ValueError(f"--trajectory must be at least 1 step, got {args.trajectory}")
    if args.curve is not None and args.curve.suffix.lower() != ".png":
        raise ValueError(f"--curve {args.curve}: the curve is written as a PNG; give a file name ending in .png")
    for option, path in (("--curve", args.curve), ("--out", args.out), ("--json", args.json)):
        if path is not None and path.is_dir():
            raise ValueError(f"{option} {path} is a folder: give a file name")
    device = resolve_device(args.device)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    load_options = {"weights": args.weights, "num_heads": args.num_heads, "objective": args.objective, "space": args.space,
                    "trust_checkpoint": args.trust_checkpoint}
    if args.curve:
        return _run_curve(args, device, precision, load_options)
    models = [(spec, open_spec(spec, **load_options)) for spec in args.models]
    if args.trajectory is None and any(varies_with_timestep(m) for _, m in models):
        raise ValueError("a dynamic (DyDiT) model's cost depends on the timestep: pass --trajectory STEPS "
                         "(e.g. --trajectory 50) to time whole sampling runs")
    log(f"measuring {plural(len(models), 'model')} at batch {args.batch_size} on {device} ({precision}), "
        f"{plural(args.warmup, 'warm-up step')}, {plural(args.rounds, 'interleaved round')}")
    results = measure_speed(models, args.batch_size, cfg_scale=args.cfg_scale, sampling_steps=args.sampling_steps,
                            warmup=args.warmup, rounds=args.rounds, device=device, precision=precision,
                            trajectory_steps=args.trajectory)
    if device.type == "cpu" and not args.no_memory:
        for result, spec in zip(results, args.models):
            result.peak_memory_mib = process_peak_memory_mib(spec, args.batch_size, args.cfg_scale, precision, load_options)
    table = format_table(results, args.batch_size, args.cfg_scale, args.sampling_steps, args.trajectory)
    print(table)
    machine = describe_machine(device, precision)
    if args.out:
        write_text_atomically(args.out, f"Machine: {machine}.\n\n{table}\n")
        log(f"wrote {args.out}")
    if args.json:
        write_text_atomically(args.json, json.dumps({"machine": machine, "batch_size": args.batch_size, "cfg_scale": args.cfg_scale,
                                      "rows": [r.to_dict() for r in results]}, indent=2) + "\n")
    return 0


def format_table(results: list[SpeedResult], batch_size: int, cfg_scale: float, sampling_steps: int,
                 trajectory: int | None = None) -> str:
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
        lines[-1] += (f" Each round timed a whole {trajectory}-step sampling run per model (DDIM / Euler from fixed noise): "
                      "latency and FLOPs are means per step over it, FLOPs counted from the decisions each model made.")
    return "\n".join(lines)


def short_name(spec: str) -> str:
    """A model's name for a title: a folder's or file's own name, a named size as it is."""
    path = Path(str(spec).rstrip("/"))
    return path.name if path.exists() else str(spec)


def describe_machine(device: torch.device, precision: str) -> str:
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, {plural(torch.get_num_threads(), 'thread')}"
    return f"{where}, {precision}, torch {torch.__version__}"


def _run_curve(args: argparse.Namespace, device, precision: str, load_options: dict) -> int:
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
                            precision=precision)
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
    machine = describe_machine(device, precision)
    if args.out:
        write_text_atomically(args.out, f"Machine: {machine}.\n\n{table}\n")
    if args.json:
        write_text_atomically(args.json, json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    return 0

