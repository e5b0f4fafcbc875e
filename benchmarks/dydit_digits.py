"""DyDiT on the embedded digits teacher at two MAC targets, beside depth pruning of similar
MACs, every model fine-tuned for the same number of steps at the same batch size.

    OMP_NUM_THREADS=1 python benchmarks/dydit_digits.py --work runs/dydit-digits

Rows: the teacher; `leandit dynamic --target 0.5` and `--target 0.7` (the model's own loss,
the paper's recipe); 0.5 with the heads and channels reordered by weight magnitude first
(`--reorder magnitude`: does it help?); 0.5 distilled from the teacher (`--mix masked-kd`);
ShortGPT depth pruning to 6 and 8 of 12 blocks (about 0.5 and 0.67 of the MACs) recovered
with masked KD (`leandit finetune`). Each is sampled (1000 class-balanced samples, 50 DDIM
steps, no guidance, seed 0) and scored with digits-FID and class agreement as the demo does;
MACs and speed-up are measured side by side in one run over whole 25-step DDIM sampling runs
at batch 250 (`measure_speed(..., trajectory_steps=25)`), MACs counted from the decisions
each model made. Finished runs are reused; `--report` rewrites the table only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

import leandit
from leandit.assets import digits_teacher_path
from leandit.cli import main as leandit_main
from leandit.data.digits import to_digits_range
from leandit.evaluate.digits import class_agreement
from leandit.evaluate.digits_features import digits_as_uint8, load_digits_features
from leandit.evaluate.feature_nets import extract_features
from leandit.evaluate.metrics import all_metrics
from leandit.evaluate.sampling import generate, make_labels, to_uint8_images
from leandit.evaluate.speed import measure_speed

HERE = Path(__file__).resolve().parent


def cli(*args: str) -> float:
    started = time.perf_counter()
    if leandit_main(list(args)) != 0:
        raise RuntimeError(f"leandit {' '.join(args)} failed")
    return time.perf_counter() - started


def score(folder: Path, samples: int, feature_net, reference) -> dict:
    model = leandit.load_model(folder)
    labels = make_labels(samples, 10)
    x = generate(model, labels, sampler="ddim", steps=50, cfg_scale=1.0, seed=0, batch_size=250, progress=False)
    images = to_uint8_images(x, "pixel")
    metrics = all_metrics(extract_features(feature_net, images, progress=False), reference)
    return {"digits_fid": metrics["fid"], "class_agreement": class_agreement(to_digits_range(x), labels.numpy())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/dydit-digits"))
    parser.add_argument("--steps", type=int, default=1000, help="fine-tuning steps of every model (default 1000)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--samples", type=int, default=1000, help="samples per model (default 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved speed rounds (default 3)")
    parser.add_argument("--only", help="comma-separated row names to (re)make, e.g. 'DyDiT 0.5'")
    parser.add_argument("--report", action="store_true", help="only write the table from finished runs")
    args = parser.parse_args()
    teacher = str(digits_teacher_path())
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    store_file = work / "results.json"
    store = json.loads(store_file.read_text()) if store_file.exists() else {}
    common = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--quiet"]

    def dynamic(name, slug, *extra):
        return name, work / slug / "model", ["dynamic", teacher, *extra, *common, "--out", str(work / slug)]

    def depth(name, slug, keep):
        prune = ["prune", teacher, "--method", "shortgpt", "--keep", str(keep), "--out", str(work / f"{slug}-pruned")]
        recover = ["finetune", str(work / f"{slug}-pruned" / "model"), "--teacher", teacher, "--mix", "masked-kd", *common,
                   "--out", str(work / slug)]
        return name, work / slug / "model", [prune, recover]

    rows = [
        dynamic("DyDiT 0.5", "dydit-0.5", "--target", "0.5"),
        depth("ShortGPT 6 of 12 + masked KD", "shortgpt-6", 6),
        dynamic("DyDiT 0.7", "dydit-0.7", "--target", "0.7"),
        depth("ShortGPT 8 of 12 + masked KD", "shortgpt-8", 8),
        dynamic("DyDiT 0.5, reordered", "dydit-0.5-reordered", "--target", "0.5", "--reorder", "magnitude"),
        dynamic("DyDiT 0.5, masked KD", "dydit-0.5-kd", "--target", "0.5", "--mix", "masked-kd"),
    ]
    only = {n.strip() for n in args.only.split(",")} if args.only else None
    if not args.report:
        feature_net = load_digits_features()
        reference = extract_features(feature_net, digits_as_uint8()[0], progress=False)
        if "teacher" not in store:
            store["teacher"] = score(Path(teacher), args.samples, feature_net, reference)
        for name, folder, commands in rows:
            if only is not None and name not in only:
                continue
            if not (folder / "config.json").exists():
                seconds = 0.0
                for command in commands if isinstance(commands[0], list) else [commands]:
                    seconds += cli(*command)
                store[name] = {"train_seconds": seconds}
            store[name] = {**store.get(name, {}), **score(folder, args.samples, feature_net, reference)}
            store_file.write_text(json.dumps(store, indent=2))
            print(name, store[name], flush=True)
        models = [("teacher", leandit.load_model(teacher))] + [(n, leandit.load_model(f)) for n, f, _ in rows if (f / "config.json").exists()]
        speeds = measure_speed(models, 250, cfg_scale=1.0, sampling_steps=50, warmup=1, rounds=args.rounds, trajectory_steps=25)
        for result in speeds:
            store.setdefault(result.name, {}).update(flops_per_step=result.flops_per_step, speedup=result.speedup,
                                                    latency_ms=result.latency_ms)
        store["machine"] = (f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, "
                            f"{torch.get_num_threads()} threads, torch {torch.__version__}")
        store_file.write_text(json.dumps(store, indent=2))
    write_report(store, args, HERE / "dydit_digits.md")


def write_report(store: dict, args, path: Path) -> None:
    dense = store["teacher"]["flops_per_step"]
    lines = [
        "# DyDiT on the digits teacher, beside depth pruning of similar MACs",
        "",
        f"Machine: {store.get('machine', '?')}. Command: `OMP_NUM_THREADS=1 python benchmarks/dydit_digits.py` "
        f"({args.steps} fine-tuning steps at batch {args.batch_size} for every model).",
        "",
        "| model | MACs (of the teacher's) | digits-FID | class agreement | speed-up (measured) | speed-up / MAC ratio |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in store.items():
        if name == "machine" or "flops_per_step" not in row:
            continue
        ratio = row["flops_per_step"] / dense
        lines.append(f"| {name} | {ratio:.1%} | {row['digits_fid']:.2f} | {row['class_agreement']:.1%} | "
                     f"{row['speedup']:.2f}x | {row['speedup'] * ratio:.0%} |")
    lines += [
        "",
        "digits-FID and class agreement: 1000 class-balanced samples, 50 DDIM steps, no guidance, seed 0 (as `leandit demo`). "
        "MACs and speed-up: whole 25-step DDIM sampling runs at batch 250, every model timed in turn in each round "
        f"({args.rounds} rounds), MACs per step counted from what each model ran (a DyDiT model's routers, the timestep "
        "embedding they read and the token routers included). The last column is the share of the ideal speed-up "
        "(1 / MAC ratio) that wall-clock time shows.",
        "",
    ]
    path.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
