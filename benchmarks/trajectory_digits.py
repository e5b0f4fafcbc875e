"""Compression against and with fewer sampling steps and step caching: whole-trajectory time
and digits-FID per row, on the embedded digits teacher and a depth-pruned, recovered copy;
and the same trajectories' speed on DiT-XL/2-sized random weights.

    OMP_NUM_THREADS=2 python benchmarks/trajectory_digits.py --pruned demo-output/recover-learnable/model
    OMP_NUM_THREADS=2 python benchmarks/trajectory_digits.py --xl          # DiT-XL/2 D28 / D14, random weights

The pruned model is the one `leandit demo` recovers (12 -> 6 blocks, learnable 1:2, masked KD).
Digits rows: 1,000 class-conditional samples per row (100 per class, no guidance, the demo's
setting), digits-FID against the real digits, class agreement, and the seconds the whole
generation took (every step of every batch of 250, as `leandit sample` runs it; the faster of
two passes per row, rows in turn). XL rows: `measure_speed` over whole trajectories (batch 1 with guidance
1.5, bf16 autocast, interleaved rounds), the time of one trajectory.
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from pathlib import Path

import torch

import leandit
from leandit.assets import digits_teacher_path
from leandit.backbones import backbone
from leandit.compress.step_cache import CacheSettings, StepCache
from leandit.evaluate.digits import class_agreement
from leandit.evaluate.digits_features import digits_as_uint8, load_digits_features
from leandit.data.digits import to_digits_range
from leandit.evaluate.feature_nets import extract_features
from leandit.evaluate.metrics import all_metrics
from leandit.evaluate.sampling import generate, make_labels, to_uint8_images
from leandit.evaluate.speed import measure_speed
from leandit.models import load_model
from leandit.models.blocks import keep_blocks

# (sampler, steps, cache interval or None)
SETTINGS = [("ddpm", 250, None), ("ddim", 50, None), ("dpm++2m", 20, None), ("ddim", 50, 2), ("ddim", 50, 3),
            ("dpm++2m", 20, 2)]
XL_SETTINGS = [("ddpm", 250, None), ("ddim", 50, None), ("dpm++2m", 20, None), ("ddim", 50, 2)]
D14 = [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27]


def name_of(model_name: str, sampler: str, steps: int, cache: int | None) -> str:
    return f"{model_name}, {sampler} {steps}" + (f", cache every {cache}" if cache else "")


def cached(model: torch.nn.Module, cache: int | None) -> torch.nn.Module:
    return StepCache(copy.deepcopy(model), CacheSettings(interval=cache)) if cache else model


def digits_rows(pruned_dir: Path) -> list[str]:
    teacher = load_model(digits_teacher_path())
    pruned = load_model(pruned_dir)
    feature_net = load_digits_features()
    reference = extract_features(feature_net, digits_as_uint8()[0], progress=False)
    labels = make_labels(1000, 10)
    generate(teacher, labels[:250], sampler="ddim", steps=2, seed=0, batch_size=250, progress=False)  # warm the allocator
    lines = ["| model, sampler, steps, cache | block calls per trajectory | seconds for 1,000 | digits-FID | class agreement |",
             "|---|---|---|---|---|"]
    base = None
    for model_name, model in (("dense (12 blocks)", teacher), ("pruned D6, recovered", pruned)):
        for sampler, steps, cache in SETTINGS:
            runner = cached(model, cache)
            times = []
            for _ in range(2):  # the faster of two passes: a shared machine slows single runs
                began = time.perf_counter()
                x = generate(runner, labels, sampler=sampler, steps=steps, seed=0, batch_size=250, progress=False)
                times.append(time.perf_counter() - began)
            seconds = min(times)
            base = base or seconds
            metrics = all_metrics(extract_features(feature_net, to_uint8_images(x, "pixel"), progress=False), reference)
            depth = backbone(model).spec.depth
            calls = steps * (1 if sampler != "heun" else 2)
            full = calls if not cache else sum(CacheSettings(interval=cache).is_full(c) for c in range(calls))
            lines.append(f"| {name_of(model_name, sampler, steps, cache)} | {full * depth:,} | {seconds:.1f} "
                         f"({base / seconds:.2f}x) | {metrics['fid']:.2f} | {class_agreement(to_digits_range(x), labels.numpy()):.1%} |")
            print(lines[-1], flush=True)
    return lines


def xl_rows(rounds: int) -> list[str]:
    torch.manual_seed(0)
    d28 = leandit.build_model("DiT-XL/2", input_size=32).eval().requires_grad_(False)
    d14 = keep_blocks(d28, D14)
    lines = ["| model, sampler, steps, cache | seconds per trajectory | speed-up over D28 ddpm 250 |", "|---|---|---|"]
    base = None
    for sampler, steps, cache in XL_SETTINGS:
        models = [(name_of(n, sampler, steps, cache), cached(m, cache)) for n, m in (("D28", d28), ("D14", d14))]
        rows = measure_speed(models, 1, cfg_scale=1.5, warmup=0, rounds=rounds, precision="bf16", trajectory_steps=steps,
                             sampler=sampler)
        for row in rows:
            seconds = row.latency_ms * steps / 1000
            base = base or seconds
            lines.append(f"| {row.name} | {seconds:,.1f} | **{base / seconds:.2f}x** |")
            print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pruned", type=Path, default=Path("demo-output/recover-learnable/model"),
                        help="the recovered 6-block digits model (from `leandit demo`)")
    parser.add_argument("--xl", action="store_true", help="time DiT-XL/2-sized D28 and D14 instead")
    parser.add_argument("--rounds", type=int, default=1, help="--xl: interleaved rounds")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    print(f"machine: {platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")
    if not args.xl and not (args.pruned / "config.json").exists():
        raise SystemExit(f"{args.pruned}: no recovered model there; run `leandit demo` first or pass --pruned")
    lines = xl_rows(args.rounds) if args.xl else digits_rows(args.pruned)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
