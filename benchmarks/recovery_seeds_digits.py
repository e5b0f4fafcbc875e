"""Plain fine-tuning vs masked KD after 12 -> 6 depth pruning of the digits teacher, repeated
over training seeds: the recovery half of recovery_digits.py (same masks, same settings, same
held-out measures) with `leandit finetune --seed S` for every S, and the table as mean ± spread.

    OMP_NUM_THREADS=2 python benchmarks/recovery_seeds_digits.py --seeds 1,2,0 --work runs/recovery-seeds

One run of recovery_digits.py compared the two mixes on one seed; its gaps were close to the
sampling noise of the class agreement (1000 samples: about ±0.5 points). Here each (mask, mix)
is trained once per seed; the quality of every finished run is stored as soon as it is
measured (quality.json), so an interrupted sweep reports the seeds it finished and a rerun
continues. `--report` writes recovery_seeds_digits.md from what is there without training.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import leandit  # noqa: E402
from leandit.assets import digits_teacher_path  # noqa: E402
from leandit.compress.depth import make_calibration_set  # noqa: E402
from leandit.data import digits_dataset  # noqa: E402
from recovery_digits import leandit_cli, quality  # noqa: E402

MASKS = ("learnable 1:2", "ShortGPT (any 6)", "oracle")
MIXES = ("plain", "masked-kd")


def mean_spread(values: list[float]) -> str:
    """mean ± sample standard deviation (n - 1), and the range."""
    if len(values) == 1:
        return f"{values[0]:.4f} (1 seed)"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} [{min(values):.4f}, {max(values):.4f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/recovery-seeds"), help="folder for the runs")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds, run in this order (default 0,1,2)")
    parser.add_argument("--steps", type=int, default=2000, help="fine-tuning steps of every recovery (default 2000)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size of pruning and recovery (default 64)")
    parser.add_argument("--samples", type=int, default=1000, help="samples for the class agreement (default 1000)")
    parser.add_argument("--report", action="store_true", help="only write the report from the finished runs")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    teacher = str(digits_teacher_path())
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    store = work / "quality.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    batch = ["--batch-size", str(args.batch_size)]
    calibration = make_calibration_set(leandit.load_model(teacher), digits_dataset(), size=1024, seed=1)

    def made(out: Path, *cli_args: str) -> Path:
        if not (out / "model" / "config.json").exists():
            seconds = leandit_cli(*cli_args, "--out", str(out))
            results.setdefault("seconds", {})[out.name] = seconds
            store.write_text(json.dumps(results, indent=2))
        return out / "model"

    if not args.report:
        # The masks of recovery_digits.py. The learnable 1:2 run (2000 steps, seed 0) chose blocks
        # [0, 2, 4, 6, 8, 10]; its exported model holds the teacher's weights of those blocks
        # (LoRA deltas are merged only with --merge-delta), so the same student is cut here
        # directly (`--method indices`; its alignment with the teacher, [1, 3, ..., 11], is the
        # learnable record's). The quality before recovery checks that it is the same model.
        sources = {
            "learnable 1:2": made(work / "learnable-1x2", "prune", teacher, "--method", "indices", "--indices", "0,2,4,6,8,10"),
            "ShortGPT (any 6)": made(work / "shortgpt", "prune", teacher, "--method", "shortgpt", "--keep", "6"),
            "oracle": made(work / "oracle", "prune", teacher, "--method", "oracle", "--keep", "6"),
        }
        for name, source in sources.items():
            if name not in results.setdefault("before", {}):
                loss, agree = quality(source, calibration, args.samples)
                results["before"][name] = {"loss": loss, "agreement": agree}
                store.write_text(json.dumps(results, indent=2))
                print(f"{name} before recovery: loss {loss:.4f}, agreement {agree * 100:.1f} %", flush=True)
        results["kept"] = {name: json.loads((source / "compression.json").read_text())[-1]["kept_indices"]
                           for name, source in sources.items()}
        for seed in seeds:
            for name, source in reversed(sources.items()):  # the cheapest recoveries first
                slug = name.split()[0].lower()
                for mix in MIXES:
                    key = f"{name} | {mix} | {seed}"
                    if key in results.get("runs", {}):
                        continue
                    teacher_args = ["--teacher", teacher] if mix != "plain" else []
                    folder = made(work / f"seed-{seed}" / f"{slug}-{mix}", "finetune", str(source), *teacher_args, "--mix", mix,
                                  "--steps", str(args.steps), "--seed", str(seed), *batch)
                    loss, agree = quality(folder, calibration, args.samples)
                    results.setdefault("runs", {})[key] = {"loss": loss, "agreement": agree}
                    store.write_text(json.dumps(results, indent=2))
                    print(f"{key}: loss {loss:.4f}, agreement {agree * 100:.1f} %", flush=True)
    write_report(results, args)


def write_report(results: dict, args) -> None:
    runs = results.get("runs", {})
    done = sorted({int(k.rsplit("|", 1)[1]) for k in runs})
    # Only seeds with all six runs enter the table: a mean over different seed sets would not compare.
    complete = [s for s in done if all(f"{m} | {x} | {s}" in runs for m in MASKS for x in MIXES)]
    lines = [
        "# Plain fine-tuning vs masked KD over training seeds (digits teacher, 12 -> 6 blocks)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, torch {torch.__version__}; shared with other jobs (`nice -n 19`). "
        f"Command: `python benchmarks/recovery_seeds_digits.py --seeds {args.seeds}` ({time.strftime('%Y-%m-%d')}).",
        "",
        f"Each cell: `leandit finetune PRUNED [--teacher digits-teacher] --mix plain|masked-kd --steps {args.steps} "
        f"--batch-size {args.batch_size} --seed S` with the settings of recovery_digits.md, measured as there "
        "(calibration loss: epsilon MSE on 1024 held-out noised digits, lower is better; class agreement of "
        f"{args.samples} DDIM-50 samples, sampling seed 0). Seeds with all six runs: {complete or 'none yet'}. "
        "Cells: mean ± standard deviation over those seeds [min, max].",
        "",
        "| pruning (12 -> 6) | kept blocks | before recovery: loss / agreement | plain: loss | masked KD: loss | plain: agreement | masked KD: agreement | masked KD lower loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in MASKS:
        if not complete:
            break
        loss = {x: [runs[f"{name} | {x} | {s}"]["loss"] for s in complete] for x in MIXES}
        agree = {x: [100 * runs[f"{name} | {x} | {s}"]["agreement"] for s in complete] for x in MIXES}
        wins = sum(k < p for p, k in zip(loss["plain"], loss["masked-kd"]))
        fmt = lambda v: (f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f} %" if len(v) > 1 else f"{v[0]:.1f} %")
        before = results.get("before", {}).get(name)
        before = f"{before['loss']:.4f} / {100 * before['agreement']:.1f} %" if before else "?"
        lines.append(f"| {name} | {results.get('kept', {}).get(name, '?')} | {before} | {mean_spread(loss['plain'])} | "
                     f"{mean_spread(loss['masked-kd'])} | {fmt(agree['plain'])} | {fmt(agree['masked-kd'])} | "
                     f"{wins} of {len(complete)} seeds |")
    lines += ["", "Every finished run (seed: loss / agreement):", ""]
    for key, value in sorted(runs.items()):
        lines.append(f"- {key}: {value['loss']:.4f} / {value['agreement'] * 100:.1f} %")
    seconds = results.get("seconds", {})
    if seconds:
        lines += ["", "Wall time of each run (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())]
    text = "\n".join(lines) + "\n"
    (HERE / "recovery_seeds_digits.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
