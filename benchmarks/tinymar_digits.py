"""TinyMAR on the embedded digits MAR teacher: its 6 + 6 encoder/decoder blocks pruned to half
(learnable 1:2, ShortGPT, oracle), each recovered two ways for the same steps (plain
fine-tuning on the model's own loss, masked KD from the teacher), every model sampled and
scored the same way.

    OMP_NUM_THREADS=1 python benchmarks/tinymar_digits.py --work runs/tinymar-digits

Pruning and recovery run through the commands a user runs (`leandit prune`, `leandit
finetune`), in process, one after another. Sampling: MAR's unmasking loop with the demo's
settings (`leandit.demo.MAR_SAMPLING`), N class-balanced samples per model with the same
seeds; digits-FID against the 1797 real digits and class agreement (an SVC on the real
digits). MACs: of generating one image with those settings, in the encoder and decoder blocks
(the part depth pruning shrinks) and in all (`leandit.models.flops.mar_generation_macs`). Finished runs in --work are reused; prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from leandit.assets import digits_mar_teacher_path
from leandit.cli import main as leandit_main
from leandit.data.digits import to_digits_range
from leandit.demo import MAR_SAMPLING, mar_generation_macs, mar_samples
from leandit.evaluate.digits import class_agreement
from leandit.evaluate.digits_features import digits_as_uint8, load_digits_features
from leandit.evaluate.feature_nets import extract_features
from leandit.evaluate.metrics import all_metrics
from leandit.evaluate.sampling import make_labels, save_grid, to_uint8_images
from leandit.models import load_model

PRUNINGS = [  # (row name, slug, `leandit prune` options; learnable gets --steps/--batch-size)
    ("learnable 1:2", "learnable", ["--method", "learnable", "--scheme", "1:2"]),
    ("ShortGPT", "shortgpt", ["--method", "shortgpt", "--keep", "6"]),
    ("oracle", "oracle", ["--method", "oracle", "--keep", "6"]),
]
RECOVERIES = [("plain", ["--mix", "plain"]), ("masked KD", ["--mix", "masked-kd", "--teacher", "TEACHER"])]


def cli(*args: str) -> float:
    started = time.perf_counter()
    if leandit_main(list(args)) != 0:
        raise RuntimeError(f"leandit {' '.join(args)} failed")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/tinymar-digits"), help="run folders (reused when finished)")
    parser.add_argument("--prune-steps", type=int, default=800, help="learnable pruning steps (default 800)")
    parser.add_argument("--recover-steps", type=int, default=400, help="recovery steps of every model (default 400)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size of pruning and recovery (default 64)")
    parser.add_argument("--per-class", type=int, default=100, help="samples per class (default 100)")
    parser.add_argument("--grid", type=Path, default=None,
                        help="write a PNG here: one row per model (the table's order), its first 2 samples of each class")
    args = parser.parse_args()
    begun = time.perf_counter()
    teacher_dir = digits_mar_teacher_path()
    teacher = "digits-mar-teacher"  # the shipped name, as a user passes it (records stay free of paths)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    models: list[tuple[str, str, str, Path]] = [("teacher", "-", "-", teacher_dir)]
    common = ["--batch-size", str(args.batch_size), "--device", "cpu", "--quiet"]
    for name, slug, method in PRUNINGS:
        prune_dir = work / f"prune-{slug}"
        if not (prune_dir / "model" / "config.json").exists():
            shutil.rmtree(prune_dir, ignore_errors=True)
            extra = ["--steps", str(args.prune_steps), *common] if method[1] == "learnable" else ["--device", "cpu", "--quiet"]
            seconds[f"prune-{slug}"] = cli("prune", teacher, *method, *extra, "--out", str(prune_dir))
        kept = json.loads((prune_dir / "decision.json").read_text())["kept_indices"]
        models.append((name, "none", kept, prune_dir / "model"))
        for recovery, options in RECOVERIES:
            out = work / f"recover-{slug}-{recovery.replace(' ', '-').lower()}"
            if not (out / "model" / "config.json").exists():
                shutil.rmtree(out, ignore_errors=True)
                options = [teacher if o == "TEACHER" else o for o in options]
                seconds[out.name] = cli("finetune", str(prune_dir / "model"), *options, "--steps", str(args.recover_steps),
                                        *common, "--out", str(out))
            models.append((name, recovery, kept, out / "model"))

    net = load_digits_features()
    reference = extract_features(net, digits_as_uint8()[0], progress=False)
    labels = make_labels(args.per_class * 10, 10)
    rows, grids = [], []
    for name, recovery, kept, folder in models:
        model = load_model(folder)
        started = time.perf_counter()
        x = mar_samples(model, labels, **MAR_SAMPLING)
        sampling = time.perf_counter() - started
        images = to_uint8_images(x, "pixel")
        grids.append(images[:20])  # labels 0..9, 0..9
        fid = all_metrics(extract_features(net, images, progress=False), reference)["fid"]
        macs = mar_generation_macs(model, **MAR_SAMPLING)
        c = model.config
        rows.append((name, recovery, kept, f"{c.encoder_depth} + {c.decoder_depth}", fid,
                     class_agreement(to_digits_range(x), labels.numpy()), macs, sampling))
        print(f"scored {name} / {recovery}: digits-FID {fid:.2f}", file=sys.stderr, flush=True)
    if args.grid:
        import numpy as np

        save_grid(args.grid, np.concatenate(grids), ncols=20, column_labels=[str(i % 10) for i in range(20)])

    teacher_macs = rows[0][6]
    s = MAR_SAMPLING
    print("# TinyMAR on the digits MAR teacher: 2x depth pruning, recovered plain or with masked KD\n")
    print(f"Machine: {_cpu_name()}, {os.cpu_count()} cores (shared with other jobs), {torch.get_num_threads()} torch "
          f"thread, fp32, torch {torch.__version__}. Command: `OMP_NUM_THREADS=1 python benchmarks/tinymar_digits.py "
          f"--prune-steps {args.prune_steps} --recover-steps {args.recover_steps} --batch-size {args.batch_size} "
          f"--per-class {args.per_class}`.\n")
    print("| method | recovery | blocks kept | encoder + decoder | digits-FID | class agreement | "
          "MMACs / image, blocks | MMACs / image, all | sampling s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, recovery, kept, depths, fid, agreement, macs, sampling in rows:
        blocks = f"{macs['blocks'] / 1e6:.1f} ({macs['blocks'] / teacher_macs['blocks']:.0%})"
        total = f"{macs['total'] / 1e6:.1f} ({macs['total'] / teacher_macs['total']:.0%})"
        print(f"| {name} | {recovery} | {kept} | {depths} | {fid:.2f} | {agreement:.1%} | {blocks} | {total} | "
              f"{sampling:.1f} |")
    guidance = "no guidance" if s["cfg_scale"] == 1 else f"guidance {s['cfg_scale']:g} (linear schedule)"
    print(f"\n{len(labels)} class-balanced samples per model, seed 0 (the same seeds for every model): MAR's unmasking "
          f"loop in {s['num_iter']} steps, {guidance}, head temperature {s['temperature']:g}, the head's DDPM on the "
          f"{s['head_steps']} timesteps. Learnable pruning: {args.prune_steps} steps at batch {args.batch_size} "
          f"(LoRA, the paper's defaults); every recovery: {args.recover_steps} steps at batch {args.batch_size} "
          "(`leandit finetune --mix plain` or `--mix masked-kd --teacher digits-mar-teacher`, the command's other "
          "defaults).")
    if seconds:
        print("\nWall time of the runs this invocation did (s): "
              + ", ".join(f"{name} {value:.0f}" for name, value in seconds.items()) + ".")
    minutes, rest = divmod(round(time.perf_counter() - begun), 60)
    print(f"\nThis invocation: {minutes} min {rest} s.")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


if __name__ == "__main__":
    main()
