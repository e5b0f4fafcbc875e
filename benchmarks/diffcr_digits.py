"""Token routing (DiffCR) on the embedded digits teacher at 30 % and 50 % compression, beside
depth pruning of similar MACs, every model fine-tuned for the same number of steps at the same
batch size.

    OMP_NUM_THREADS=1 python benchmarks/diffcr_digits.py --work runs/diffcr-digits

Rows: the teacher; `leandit route --target 0.3` and `--target 0.5` (the paper's budget on the
mean kept ratio, the model's own loss); 0.5 distilled from the teacher (`--mix masked-kd`);
`--target 0.5 --budget macs` (the budget on the MAC ratio, attention's quadratic cost and the
unrouted parts counted); for each routed model a ShortGPT depth-pruned model (`leandit prune
--method shortgpt --keep K` + `leandit finetune --mix masked-kd`, as benchmarks/dydit_digits.py
does) with K the number of blocks whose MACs are nearest the routed model's. Each model is
sampled and scored exactly as in dydit_digits.py (1000 class-balanced samples, 50 DDIM steps,
no guidance, seed 0; digits-FID and class agreement); MACs and speed-up come from one
`leandit bench --trajectory 25` run over all finished models at batch 250 (whole DDIM sampling
runs, MACs counted from what each model ran). The learned ratios and token maps of the 50 %
model come from `leandit analyze ratios` (benchmarks/diffcr_digits_ratios.png,
diffcr_digits_token_maps.png). Training runs go `--jobs` at a time, each its own one-thread
process, while the finished models are scored. Finished runs are reused (`--only` picks routed
rows by folder name; a later call adds its rows to the table); `--report` rewrites the table only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path

import torch

import leandit
from leandit.assets import digits_teacher_path
from leandit.evaluate.digits_features import digits_as_uint8, load_digits_features
from leandit.evaluate.feature_nets import extract_features

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from dydit_digits import cli, score  # noqa: E402  the same sampling and scoring as DyDiT's table

ROUTED = [  # (row name, slug, `leandit route` options)
    ("DiffCR 30 %", "diffcr-0.3", ["--target", "0.3"]),
    ("DiffCR 50 %", "diffcr-0.5", ["--target", "0.5"]),
    ("DiffCR 50 %, masked KD", "diffcr-0.5-kd", ["--target", "0.5", "--mix", "masked-kd"]),
    ("DiffCR 50 % of the MACs", "diffcr-macs-0.5", ["--target", "0.5", "--budget", "macs"]),
]


def depth_macs_ratio(model, keep: int) -> float:
    """The MAC ratio of the teacher with `keep` of its blocks, from a routed model's counts
    (every block of the teacher costs the same; the router's MACs taken off)."""
    macs, T = model.macs, model.num_tokens
    full = macs.blocks(torch.full((model.depth,), T)) - model.routed_blocks[0].hidden_size * T
    return float((macs.fixed + full[:keep].sum()) / macs.dense_total)


def nearest_depth(routed_folder: Path) -> int:
    """The number of kept blocks whose MACs are nearest the routed model's (mean over regions)."""
    model = leandit.load_model(routed_folder)
    ratio = float(model.mac_ratio_per_region().mean())
    return min(range(1, model.depth + 1), key=lambda keep: abs(depth_macs_ratio(model, keep) - ratio))


def leandit_process(*args: str) -> float:
    """`python -m leandit ARGS` in its own process (one thread), as a user runs it; its seconds."""
    started = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "leandit", *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"leandit {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/diffcr-digits"))
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps of every model (default 150)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--samples", type=int, default=1000, help="samples per model (default 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved speed rounds (default 3)")
    parser.add_argument("--jobs", type=int, default=2, help="training runs at once, each its own one-thread process (default 2)")
    parser.add_argument("--only", help="comma-separated routed rows to run by folder name (default all), e.g. "
                        "diffcr-0.3,diffcr-0.5")
    parser.add_argument("--report", action="store_true", help="only write the table from finished runs")
    args = parser.parse_args()
    only = {n.strip() for n in args.only.split(",")} if args.only else None
    started = time.perf_counter()
    teacher = str(digits_teacher_path())
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    store_file = work / "results.json"
    store = json.loads(store_file.read_text()) if store_file.exists() else {}
    common = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--quiet"]
    lock = threading.Lock()  # the store is written from the training threads too

    def save() -> None:
        with lock:
            store_file.write_text(json.dumps(store, indent=2))

    if not args.report:
        feature_net = load_digits_features()
        reference = extract_features(feature_net, digits_as_uint8()[0], progress=False)

        def scored(name: str, folder: Path) -> None:
            if "digits_fid" not in store.get(name, {}):
                result = score(folder, args.samples, feature_net, reference)
                with lock:
                    store[name] = {**store.get(name, {}), "folder": str(folder), **result}
                save()
                print(name, store[name], flush=True)

        def route(name: str, slug: str, extra: list[str]) -> None:
            if not (work / slug / "model" / "config.json").exists():
                seconds = leandit_process("route", teacher, *extra, *common, "--out", str(work / slug))
                with lock:
                    store[name] = {**store.get(name, {}), "train_seconds": seconds}
                save()

        def depth(keep: int) -> None:
            name = f"ShortGPT {keep} of 12 + masked KD"
            if not (work / f"shortgpt-{keep}" / "model" / "config.json").exists():
                seconds = leandit_process("prune", teacher, "--method", "shortgpt", "--keep", str(keep), "--out",
                                          str(work / f"shortgpt-{keep}-pruned"), "--quiet", "--overwrite")
                seconds += leandit_process("finetune", str(work / f"shortgpt-{keep}-pruned" / "model"), "--teacher", teacher,
                                           "--mix", "masked-kd", *common, "--out", str(work / f"shortgpt-{keep}"))
                with lock:
                    store[name] = {**store.get(name, {}), "train_seconds": seconds}
                save()

        rows = [row for row in ROUTED if only is None or row[1] in only]
        keeps: dict[str, int] = {}
        with ThreadPoolExecutor(args.jobs) as pool:
            # The routed models train while the teacher is scored; as each finishes, its depth-pruned
            # counterpart starts training and the routed model is scored meanwhile.
            routing = {pool.submit(route, *row): row for row in rows}
            scored("teacher", Path(teacher))
            pruning: dict[int, Future] = {}
            for job in as_completed(routing):
                job.result()
                name, slug, _ = routing[job]
                keeps[name] = nearest_depth(work / slug / "model")
                if keeps[name] not in pruning:
                    pruning[keeps[name]] = pool.submit(depth, keeps[name])
                scored(name, work / slug / "model")
            for keep, job in sorted(pruning.items()):
                job.result()
                scored(f"ShortGPT {keep} of 12 + masked KD", work / f"shortgpt-{keep}" / "model")
        # Every finished routed row (of this run or of an earlier one with other --only rows), each followed
        # by its depth-pruned counterpart: all timed together in one bench run.
        order = ["teacher"]
        for name, slug, _ in ROUTED:
            if "digits_fid" not in store.get(name, {}):
                continue
            depth_name = f"ShortGPT {nearest_depth(work / slug / 'model')} of 12 + masked KD"
            if "digits_fid" in store.get(depth_name, {}):
                order += [name] + ([depth_name] if depth_name not in order else [])
        bench = work / "bench.json"
        cli("bench", *[store[n]["folder"] for n in order], "--batch-size", "250", "--cfg-scale", "1", "--sampling-steps", "50",
            "--trajectory", "25", "--warmup", "1", "--rounds", str(args.rounds), "--no-memory", "--json", str(bench))
        measured = json.loads(bench.read_text())
        for name, row in zip(order, measured["rows"]):
            store[name].update(flops_per_step=row["flops_per_step"], speedup=row["speedup"], latency_ms=row["latency_ms"],
                              latency_spread_ms=row["latency_spread_ms"])
        store["order"] = order
        store["settings"] = {"steps": args.steps, "batch_size": args.batch_size, "samples": args.samples, "rounds": args.rounds}
        store["machine"] = measured["machine"]
        cli("analyze", "ratios", store["DiffCR 50 %"]["folder"], "--out", str(work / "ratios-0.5"))
        shutil.copyfile(work / "ratios-0.5" / "ratios.png", HERE / "diffcr_digits_ratios.png")
        shutil.copyfile(work / "ratios-0.5" / "token_maps.png", HERE / "diffcr_digits_token_maps.png")
        for name, slug, _ in ROUTED:
            if name not in order:
                continue
            store[name]["ratio_table"] = leandit.load_model(work / slug / "model").ratio_table()
            store[name]["last_logs"] = json.loads((work / slug / "metrics.jsonl").read_text().splitlines()[-1])
        store["run_seconds"] = store.get("run_seconds", 0.0) + time.perf_counter() - started
        save()
    write_report(store, args, HERE / "diffcr_digits.md")


def write_report(store: dict, args, path: Path) -> None:
    args = argparse.Namespace(**{**vars(args), **store.get("settings", {})})  # what the measured run used
    dense = store["teacher"]["flops_per_step"]
    lines = [
        "# Token routing (DiffCR) on the digits teacher, beside depth pruning of similar MACs",
        "",
        f"Machine: {store.get('machine', '?')}. Command: `OMP_NUM_THREADS=1 python benchmarks/diffcr_digits.py` "
        f"({args.steps} fine-tuning steps at batch {args.batch_size} for every model; the training runs go in parallel, "
        f"each a one-thread process, so their wall times overlap; {store.get('run_seconds', 0) / 60:.0f} min in all).",
        "",
        "| model | MACs (of the teacher's) | digits-FID | class agreement | latency / step (ms) | speed-up (measured) | speed-up / ideal | training wall (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in store.get("order", []):
        row = store[name]
        ratio = row["flops_per_step"] / dense
        trained = f"{row['train_seconds']:.0f}" if "train_seconds" in row else "-"
        latency = f"{row['latency_ms']:.0f} ± {row['latency_spread_ms']:.0f}" if "latency_spread_ms" in row else "?"
        lines.append(f"| {name} | {ratio:.1%} | {row['digits_fid']:.2f} | {row['class_agreement']:.1%} | {latency} | "
                     f"{row['speedup']:.2f}x | {row['speedup'] * ratio:.0%} | {trained} |")
    lines += [
        "",
        f"digits-FID and class agreement: {args.samples} class-balanced samples, 50 DDIM steps, no guidance, seed 0 (the same "
        "samples, sampler and seeds as benchmarks/dydit_digits.md, so the numbers compare). MACs and speed-up: one "
        f"`leandit bench --trajectory 25 --batch-size 250 --cfg-scale 1 --rounds {args.rounds}` over all models (whole "
        "25-step DDIM sampling runs, every model timed in turn in each round; MACs per step counted from what each model "
        "ran, the token routers included); latency is the median per step over the rounds ± half the interquartile range. "
        "'speed-up / ideal' is the share of the ideal speed-up (1 / MAC ratio) that "
        "wall-clock time shows. The depth-pruned rows keep the number of blocks whose MACs are nearest each routed "
        "model's (ShortGPT scores, recovered with masked KD from the teacher).",
        "",
        "Learned schedules (k of 16 tokens per block, regions t 0-249 | 250-499 | 500-749 | 750-999; MAC ratio per region):",
        "",
    ]
    for name, _, _ in ROUTED:
        table = store.get(name, {}).get("ratio_table")
        if table is None:
            continue
        per_block = " ".join("/".join(str(k) for k in row) for row in table["schedule"])
        macs = " | ".join(f"{v:.0%}" for v in table["macs_ratio_per_region"])
        lines.append(f"- {name}: {per_block}; MACs {macs}")
    lines += ["", "![learned ratios of DiffCR 50 %](diffcr_digits_ratios.png)", "",
              "![token maps of DiffCR 50 %](diffcr_digits_token_maps.png)", ""]
    old = path.read_text() if path.exists() else ""
    if "\n## Reading" in old:  # the hand-written reading of a run stays
        lines.append(old[old.index("\n## Reading") + 1:].rstrip("\n") + "\n")
    path.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
