"""The digits teacher through the diffusers path and the native path side by side: converted to
a diffusers `DiTTransformer2DModel`, pruned 12 -> 6 (learnable 1:2 and ShortGPT) and recovered
with masked KD, exactly as the native leandit DiT is; digits-FID and class agreement of both.

    OMP_NUM_THREADS=2 python benchmarks/diffusers_digits.py --work runs/diffusers-digits

Every model is made by the commands a user runs (`leandit convert`, `prune`, `finetune`), in
process; finished stages are reused. The two teachers have the same weights; they differ only
in diffusers' time-embedding frequency shift (1 instead of 0, see benchmarks/convert_dit.md),
so the diffusers teacher is itself measured. Metrics: 1000 samples (DDIM 50, no guidance) per
sampling seed, two seeds, digits-FID against the 1797 real digits with the shipped digits
feature net and the class agreement of the teacher's SVC; the two seeds' spread is the noise
a difference between the paths has to exceed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import leandit
from leandit.backbones import backbone
from leandit.cli import main as leandit_main
from leandit.data.digits import to_digits_range
from leandit.evaluate.digits import class_agreement
from leandit.evaluate.digits_features import digits_as_uint8, load_digits_features
from leandit.evaluate.feature_nets import extract_features
from leandit.evaluate.metrics import all_metrics
from leandit.evaluate.sampling import generate, make_labels, to_uint8_images

HERE = Path(__file__).resolve().parent
PRUNINGS = {"learnable 1:2": ["--method", "learnable", "--scheme", "1:2"], "ShortGPT": ["--method", "shortgpt", "--keep", "6"]}


def cli(*args: str, quiet: bool = True) -> None:
    if leandit_main([*args, *(["--quiet"] if quiet else [])]) != 0:
        raise RuntimeError(f"leandit {' '.join(args)} failed")


def scores(folder: Path | str, seeds: list[int], feature_net, reference) -> dict:
    model = leandit.load_model(folder)
    classes = backbone(model).spec.conditioning.num_classes
    labels = make_labels(100 * classes, classes)
    fids, agreements = [], []
    for seed in seeds:
        x = generate(model, labels, sampler="ddim", steps=50, seed=seed, batch_size=250, progress=False)
        images = to_uint8_images(x, "pixel")
        fids.append(all_metrics(extract_features(feature_net, images, progress=False), reference)["fid"])
        agreements.append(class_agreement(to_digits_range(x), labels.numpy()))
    return {"fid": fids, "agreement": agreements}


def cell(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    mean = statistics.mean(values) * scale
    spread = (max(values) - min(values)) * scale / 2
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/diffusers-digits"))
    parser.add_argument("--prune-steps", type=int, default=1000, help="learnable pruning steps (the demo's 1000)")
    parser.add_argument("--recover-steps", type=int, default=400, help="masked-KD steps (the demo's 400)")
    parser.add_argument("--seeds", default="0,1", help="sampling seeds (default 0,1)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    work = args.work
    started = time.perf_counter()
    feature_net = load_digits_features()
    reference = extract_features(feature_net, digits_as_uint8()[0], progress=False)

    converted = work / "teacher-diffusers"
    if not converted.exists():
        cli("convert", "digits-teacher", "--to", "diffusers", "--out", str(converted), quiet=False)
    teachers = {"native (leandit DiT)": "digits-teacher", "diffusers DiT": str(converted)}
    rows: dict[str, dict] = {}
    for path, teacher in teachers.items():
        slug = "native" if path.startswith("native") else "diffusers"
        rows[f"{path}: teacher, 12 blocks"] = scores(teacher, seeds, feature_net, reference)
        for name, method in PRUNINGS.items():
            prune_dir, recover_dir = work / slug / f"prune-{name.split()[0].lower()}", work / slug / f"recover-{name.split()[0].lower()}"
            learnable = method[1] == "learnable"
            if not (prune_dir / "model").exists():
                cli("prune", teacher, *method, *(["--steps", str(args.prune_steps), "--batch-size", "64"] if learnable else []),
                    "--out", str(prune_dir))
            if not (recover_dir / "model").exists():
                cli("finetune", str(prune_dir / "model"), "--teacher", teacher, "--steps", str(args.recover_steps),
                    "--batch-size", "64", "--out", str(recover_dir))
            kept = leandit.load_model(prune_dir / "model").compression[-1]["kept_indices"]
            rows[f"{path}: {name} {kept}, recovered"] = scores(recover_dir / "model", seeds, feature_net, reference)
        print(json.dumps(rows), flush=True)

    lines = [
        "# The digits teacher through the diffusers path and the native path",
        "",
        f"Machine: {platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads (shared with other jobs), "
        f"torch {torch.__version__}; {time.perf_counter() - started:.0f} s this invocation. Command: "
        f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python benchmarks/diffusers_digits.py --prune-steps {args.prune_steps} --recover-steps "
        f"{args.recover_steps} --seeds {args.seeds}`.",
        "",
        f"Each cell: mean ± half the range over sampling seeds {args.seeds} (1000 samples each, DDIM 50, no guidance). "
        f"Pruning and recovery as in the demo: learnable 1:2 for {args.prune_steps} steps or ShortGPT keeping 6, then "
        f"masked KD from the model's own teacher for {args.recover_steps} steps at batch 64.",
        "",
        "| model | digits-FID | class agreement (%) |",
        "|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(f"| {name} | {cell(row['fid'])} | {cell(row['agreement'], 100, 1)} |")
    (HERE / "diffusers_digits.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
