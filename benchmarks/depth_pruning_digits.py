"""Depth pruning of the embedded digits teacher, 12 -> 6 blocks: the learnable 1:2 run, every
baseline, and the calibration-loss histogram of random masks (TinyFusion Figures 5 and 6).

    OMP_NUM_THREADS=2 python benchmarks/depth_pruning_digits.py --work runs/depth-bench

runs `leandit prune --method learnable` and `leandit analyze calibration` as a user would
(timed), scores each baseline on the same calibration set, prints a markdown table and copies
the two figures next to this script.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import leandit
from leandit.assets import digits_teacher_path
from leandit.compress.depth import (
    calibration_loss,
    global_scheme,
    make_calibration_set,
    oracle,
    parse_scheme,
    random_method,
    score_method,
)
from leandit.compress.depth.learnable import auto_ema_decay
from leandit.data import digits_dataset

HERE = Path(__file__).resolve().parent


def leandit_cli(*args: str) -> float:
    """Run the CLI; return its wall time in seconds."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "leandit.cli", *args], check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/depth-bench"), help="folder for the runs")
    parser.add_argument("--steps", type=int, default=2000, help="learnable pruning steps (default 2000)")
    parser.add_argument("--batch-size", type=int, default=64, help="learnable pruning batch size (default 64)")
    parser.add_argument("--samples", type=int, default=1000, help="random masks in the histogram (default 1000)")
    args = parser.parse_args()
    teacher = str(digits_teacher_path())
    learn_dir = args.work / "learnable-1x2"
    analysis_dir = args.work / "calibration"

    finished = learn_dir / "model" / "compression.json"
    if finished.exists():  # reuse a finished run of the same folder; its record holds its time
        learn_seconds = json.loads(finished.read_text())[-1]["seconds_this_invocation"]
        print(f"reusing {learn_dir} (trained in {learn_seconds:.0f} s)")
    else:
        learn_seconds = leandit_cli(
            "prune", teacher, "--method", "learnable", "--scheme", "1:2", "--steps", str(args.steps),
            "--batch-size", str(args.batch_size), "--out", str(learn_dir), "--quiet",
        )
    analysis_seconds = leandit_cli(
        "analyze", "calibration", teacher, "--keep", "6", "--samples", str(args.samples),
        "--mark", f"learnable 1:2={learn_dir / 'model'}", "--out", str(analysis_dir), "--quiet",
    )

    model = leandit.load_model(teacher)
    calibration = make_calibration_set(model, digits_dataset(), size=256, seed=0)
    learned = json.loads((learn_dir / "model" / "compression.json").read_text())[-1]
    summary = json.loads((analysis_dir / "summary.json").read_text())
    random_losses = summary["random"]
    rows = [("learnable 1:2", learned["kept_indices"])]
    for scheme_name, scheme in (("1:2", parse_scheme("1:2", 12)), ("any 6 of 12", global_scheme(12, 6))):
        for method in ("shortgpt", "fluxlite", "sensitivity"):
            rows.append((f"{method} ({scheme_name})", score_method(method, model, calibration, scheme, progress=False).kept))
    rows.append(("oracle", oracle(global_scheme(12, 6)).kept))
    for pick in ("min-loss", "median-loss"):
        rows.append((f"random {pick} of 100 (any 6 of 12)",
                     random_method(model, calibration, global_scheme(12, 6), pick, 100, seed=1, progress=False).kept))

    randoms = np.array([float(r["calibration_loss"]) for r in csv.DictReader(open(analysis_dir / "calibration_losses.csv"))
                        if r["kind"] == "random"])
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if os.environ.get("OMP_NUM_THREADS") else ""
    lines = [
        "# Depth pruning of the digits teacher, 12 -> 6 blocks",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, torch {torch.__version__}. "
        f"Command: `{threads}python benchmarks/depth_pruning_digits.py`.",
        "",
        f"Learnable 1:2 (`leandit prune {Path(teacher).name} --method learnable --scheme 1:2 --steps {args.steps} "
        f"--batch-size {args.batch_size}`, LoRA r8/alpha 16, temperature 4 -> 0.1, scale 100, EMA decay "
        f"auto = {auto_ema_decay(args.steps):g}): **{learn_seconds / 60:.1f} min** wall time.",
        f"Group confidences at the end (EMA logits): {', '.join('%.3f' % g['confidence'] for g in learned['groups'])}.",
        "",
        f"Calibration loss: epsilon MSE of the pruned model right after pruning (no fine-tuning), 256 digits, fixed "
        f"noise, timesteps spread over 0..999. Unpruned teacher: {summary['unpruned']:.4f}. "
        f"{summary['samples']} random masks (any 6 of 12, {summary['distinct']} distinct; "
        f"`leandit analyze calibration`, {analysis_seconds:.0f} s): min {random_losses['min']:.4f}, median "
        f"{random_losses['median']:.4f}, max {random_losses['max']:.4f}.",
        "",
        "| method | kept blocks | calibration loss | random masks with a lower loss |",
        "|---|---|---|---|",
    ]
    for name, kept in rows:
        loss = calibration_loss(model, calibration, kept)
        lines.append(f"| {name} | {kept} | {loss:.4f} | {(randoms < loss).mean() * 100:.1f} % |")
    lines += [
        "",
        "A low loss right after pruning is not the goal: TinyFusion's point is that the mask that recovers best",
        "after fine-tuning is not the one with the lowest loss before it (recovery is the next issue's benchmark).",
        "",
        "![decisions](depth_pruning_digits_decisions.png)",
        "",
        "![calibration histogram](depth_pruning_digits_calibration.png)",
    ]
    shutil.copy(learn_dir / "decisions.png", HERE / "depth_pruning_digits_decisions.png")
    shutil.copy(analysis_dir / "calibration_histogram.png", HERE / "depth_pruning_digits_calibration.png")
    text = "\n".join(lines) + "\n"
    (HERE / "depth_pruning_digits.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
