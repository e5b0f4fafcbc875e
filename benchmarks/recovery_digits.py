"""Recovery after depth pruning on the embedded digits teacher, 12 -> 6 blocks: the learnable
1:2 mask, ShortGPT and the oracle, each recovered by plain fine-tuning and by masked KD for the
same number of steps; then an iterated pruning 6 -> 3 distilled from the intermediate or from
the original model.

    OMP_NUM_THREADS=2 python benchmarks/recovery_digits.py --work runs/recovery-bench

Every model is made by the CLI as a user would (`leandit prune`, `leandit finetune`); finished
runs are reused. Quality is measured on held-out data: the calibration loss (epsilon MSE on
1024 noised digits with fixed noise and timesteps, a different seed from the one the baselines
chose their blocks with) and the class agreement of 1000 DDIM-50 samples judged by an SVC
trained on the real digits. Digits-FID comes with the evaluation issue.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import leandit
from leandit.assets import digits_teacher_path
from leandit.compress.depth import calibration_loss, make_calibration_set
from leandit.data import digits_dataset
from leandit.data.digits import to_digits_range
from leandit.evaluate.digits import class_agreement
from leandit.evaluate.sampling import generate, make_labels

HERE = Path(__file__).resolve().parent


def leandit_cli(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "leandit.cli", *args, "--quiet"], check=True)
    return time.perf_counter() - started


def quality(folder: Path, calibration, samples: int) -> tuple[float, float]:
    model = leandit.load_model(folder)
    loss = calibration_loss(model, calibration)
    labels = make_labels(samples, model.config.num_classes, "balanced")
    x = generate(model, labels, sampler="ddim", steps=50, seed=0, batch_size=250, progress=False)
    return loss, class_agreement(to_digits_range(x), labels.numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/recovery-bench"), help="folder for the runs")
    parser.add_argument("--learnable", type=Path, default=Path("runs/depth-bench/learnable-1x2/model"),
                        help="a finished learnable 1:2 model folder to reuse (made here if missing)")
    parser.add_argument("--steps", type=int, default=2000, help="fine-tuning steps of every recovery (default 2000)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size of pruning and recovery (default 64)")
    parser.add_argument("--samples", type=int, default=1000, help="samples for the class agreement (default 1000)")
    args = parser.parse_args()
    teacher = str(digits_teacher_path())
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    times_file = work / "times.json"
    times = json.loads(times_file.read_text()) if times_file.exists() else {}

    def made(name: str, out: Path, *cli_args: str) -> Path:
        """Run a CLI step unless its model exists; remember how long it took."""
        if not (out / "model" / "config.json").exists():
            times[name] = leandit_cli(*cli_args, "--out", str(out))
            times_file.write_text(json.dumps(times, indent=2))
        return out / "model"

    batch = ["--batch-size", str(args.batch_size)]
    sources = {}
    if args.learnable.exists():
        sources["learnable 1:2"] = args.learnable
    else:
        sources["learnable 1:2"] = made("prune learnable 1:2", work / "learnable-1x2", "prune", teacher, "--method", "learnable",
                                        "--scheme", "1:2", "--steps", "2000", *batch)
    sources["ShortGPT (any 6)"] = made("prune shortgpt", work / "shortgpt", "prune", teacher, "--method", "shortgpt", "--keep", "6")
    sources["oracle"] = made("prune oracle", work / "oracle", "prune", teacher, "--method", "oracle", "--keep", "6")

    recovered = {}
    for name, source in sources.items():
        slug = name.split()[0].lower()
        for mix in ("plain", "masked-kd"):
            out = work / f"{slug}-{mix}"
            teacher_args = ["--teacher", teacher] if mix != "plain" else []
            recovered[name, mix] = made(f"finetune {slug} {mix}", out, "finetune", str(source), *teacher_args, "--mix", mix,
                                        "--steps", str(args.steps), *batch)

    # Iterated pruning 12 -> 6 -> 3: the recovered learnable D6 is pruned again (learnable 1:2)
    # and distilled from itself (the intermediate) or from the original D12.
    d6 = recovered["learnable 1:2", "masked-kd"]
    d3 = made("prune learnable 6->3", work / "iter-d3", "prune", str(d6), "--method", "learnable", "--scheme", "1:2",
              "--steps", "1000", *batch)
    iterated = {}
    for label, t in (("intermediate D6", d6), ("original D12", teacher)):
        slug = label.split()[0]
        iterated[label] = made(f"finetune d3 from {slug}", work / f"iter-d3-from-{slug}", "finetune", str(d3), "--teacher", str(t),
                               "--mix", "masked-kd", "--steps", str(args.steps), *batch)

    calibration = make_calibration_set(leandit.load_model(teacher), digits_dataset(), size=1024, seed=1)
    teacher_loss, teacher_agree = quality(Path(teacher), calibration, args.samples)
    lines = [
        "# Recovery after depth pruning on the digits teacher (12 -> 6 blocks, and 6 -> 3)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, torch {torch.__version__}. "
        f"Command: `OMP_NUM_THREADS=2 python benchmarks/recovery_digits.py` ({time.strftime('%Y-%m-%d')}).",
        "",
        f"Every recovery: `leandit finetune PRUNED [--teacher digits-teacher] --mix plain|masked-kd --steps {args.steps} "
        f"--batch-size {args.batch_size}` (AdamW 2e-4, cosine to 1e-4, grad clip 1, EMA auto = "
        f"{1 - 10 / args.steps:g}). plain = the diffusion loss alone; masked-kd = 0.9 logits KD (epsilon MSE + variance "
        "KL) + 0.1 diffusion loss + RepKD with 2-sigma outlier mask, weight 1e-2 -> 0.",
        "",
        "Quality on held-out inputs: **calibration loss** = epsilon MSE on 1024 noised digits (seed 1, fixed noise, "
        "timesteps over 0..999; lower is better) and **class agreement** = share of 1000 class-balanced DDIM-50 samples "
        "(no guidance) that an SVC trained on the real digits puts in the class asked for. Digits-FID arrives with the "
        f"evaluation issue. Unpruned teacher (12 blocks): loss {teacher_loss:.4f}, agreement {teacher_agree * 100:.1f} %.",
        "",
        "| pruning (12 -> 6) | kept blocks | before recovery: loss / agreement | plain fine-tuning | masked KD |",
        "|---|---|---|---|---|",
    ]
    for name, source in sources.items():
        kept = json.loads((source / "compression.json").read_text())[-1]["kept_indices"]
        before = quality(source, calibration, args.samples)
        cells = [f"{before[0]:.4f} / {before[1] * 100:.1f} %"]
        for mix in ("plain", "masked-kd"):
            loss, agree = quality(recovered[name, mix], calibration, args.samples)
            cells.append(f"{loss:.4f} / {agree * 100:.1f} %")
        lines.append(f"| {name} | {kept} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)

    d3_kept = json.loads((d3 / "compression.json").read_text())[-1]["kept_indices"]
    before = quality(d3, calibration, args.samples)
    lines += [
        "",
        f"Iterated: the masked-KD-recovered learnable D6 pruned again with learnable 1:2 (1000 steps) keeps its blocks "
        f"{d3_kept}; before recovery: loss {before[0]:.4f}, agreement {before[1] * 100:.1f} %. Then {args.steps} steps of masked KD:",
        "",
        "| teacher of the D3 | teacher blocks aligned with the student's | loss | agreement |",
        "|---|---|---|---|",
    ]
    for label, folder in iterated.items():
        record = json.loads((folder / "compression.json").read_text())[-1]
        loss, agree = quality(folder, calibration, args.samples)
        lines.append(f"| {label} | {record['teacher_layers']} | {loss:.4f} | {agree * 100:.1f} % |")
    lines += ["", "Wall time of each step on this machine (seconds; a reused step keeps the time of the run that made it):", ""]
    lines += [f"- {name}: {seconds:.0f} s" for name, seconds in times.items()]
    text = "\n".join(lines) + "\n"
    (HERE / "recovery_digits.md").write_text(text)
    print(text)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
