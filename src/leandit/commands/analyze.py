"""`leandit analyze`: looking inside a model before deciding how to compress it.

`analyze calibration`: the calibration loss of K random masks of a scheme as a histogram,
with the baselines and any pruned model's mask marked (TinyFusion Figure 5), plus the raw
numbers as CSV.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from ..compress.depth import (
    SCORE_METHODS,
    calibration_loss,
    global_scheme,
    make_calibration_set,
    oracle,
    parse_scheme,
    random_masks_losses,
    score_method,
)
from ..compress.depth.scheme import mask_to_indices
from ..data import open_training_data
from ..evaluate.plots import plot_calibration_histogram
from ..models.blocks import depth_of
from ..models.io import read_compression
from ..train.distributed import resolve_device
from .common import add_model_options, log, open_model

BASELINES = (*SCORE_METHODS, "oracle")
HISTOGRAM = "calibration_histogram.png"
TABLE = "calibration_losses.csv"


def add_parser(sub) -> None:
    p = sub.add_parser("analyze", help="analyses that guide compression (calibration-loss histogram of random masks)")
    inner = p.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True, help="calibration: loss histogram of random masks")
    c = inner.add_parser(
        "calibration",
        help="calibration loss of K random masks, with baselines and pruned models marked",
        description="Draw K random masks of a scheme, compute the calibration loss of each (the model's MSE on a fixed "
        "calibration set with fixed noise and timesteps, running only the kept blocks), and write "
        f"{HISTOGRAM} with the baselines' and the given pruned models' masks marked, plus every number in {TABLE}.",
    )
    c.add_argument("model", help="the unpruned model (folder or checkpoint file)")
    c.add_argument("--out", type=Path, required=True, help=f"folder for {HISTOGRAM} and {TABLE}")
    c.add_argument("--scheme", help="draw masks of this N:M scheme (e.g. 1:2); or use --keep")
    c.add_argument("--keep", type=int, help="draw masks that keep this many blocks anywhere (the paper: 14 of 28)")
    c.add_argument("--samples", type=int, default=1000, help="random masks to draw (default 1000)")
    c.add_argument("--baselines", default=",".join(BASELINES), help=f"baselines to mark, comma-separated from {', '.join(BASELINES)}; '' for none (default all)")
    c.add_argument("--mark", action="append", default=[], metavar="NAME=FOLDER",
                   help="mark a pruned model folder's kept blocks (evaluated on this model's weights), e.g. learnable=runs/prune/model (repeatable)")
    c.add_argument("--data", default="digits", help="'digits' or a folder of latent shards (default digits)")
    c.add_argument("--calibration-size", type=int, default=256, help="images in the calibration set (default 256)")
    c.add_argument("--calibration-seed", type=int, default=0, help="seed of the calibration noise (default 0)")
    c.add_argument("--eval-batch-size", type=int, default=64, help="batch size of calibration forward passes (default 64)")
    c.add_argument("--seed", type=int, default=0, help="seed of the random masks (default 0)")
    c.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    add_model_options(c)
    c.set_defaults(run=run_calibration)


def _marked_folders(specs: list[str], depth: int) -> dict[str, list[int]]:
    marks = {}
    for spec in specs:
        if "=" not in spec:
            raise ValueError(f"--mark takes NAME=FOLDER, got {spec!r}")
        name, folder = spec.split("=", 1)
        records = read_compression(Path(folder))
        if not Path(folder).is_dir() or not records or "kept_indices" not in records[-1]:
            raise ValueError(f"--mark {spec}: {folder} is not a pruned model folder (no compression.json with kept_indices)")
        record = records[-1]
        if record.get("source_depth") != depth:
            raise ValueError(f"--mark {spec}: that model was pruned from {record.get('source_depth')} blocks, this model has {depth}")
        marks[name] = list(record["kept_indices"])
    return marks


def run_calibration(args: argparse.Namespace) -> int:
    if args.samples < 1:
        raise ValueError(f"--samples must be at least 1, got {args.samples}")
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; choose from {', '.join(BASELINES)}")
    model = open_model(args.model, args)
    depth = depth_of(model)
    if bool(args.scheme) == (args.keep is not None):
        raise ValueError("give exactly one of --scheme (e.g. 1:2) or --keep K")
    scheme = parse_scheme(args.scheme, depth) if args.scheme else global_scheme(depth, args.keep)
    marked = _marked_folders(args.mark, depth)
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is a file: pass a folder")
    device = resolve_device(args.device)
    model.to(device)
    calibration = make_calibration_set(model, open_training_data(args.data), args.calibration_size, args.calibration_seed)
    progress = not args.quiet
    log(f"calibration loss of {args.samples} random masks of {scheme} ({scheme.num_candidates:,} possible) on {args.model}")
    masks, losses = random_masks_losses(model, calibration, scheme, args.samples, args.seed, args.eval_batch_size, progress)
    rows = [("random", str(i), loss, mask_to_indices(mask)) for i, (mask, loss) in enumerate(zip(masks, losses))]
    marks: dict[str, float] = {}
    for name in baselines:
        decision = oracle(scheme) if name == "oracle" else score_method(name, model, calibration, scheme, args.eval_batch_size, progress)
        marks[name] = calibration_loss(model, calibration, decision.kept, args.eval_batch_size)
        rows.append(("baseline", name, marks[name], decision.kept))
    for name, kept in marked.items():
        marks[name] = calibration_loss(model, calibration, kept, args.eval_batch_size)
        rows.append(("marked", name, marks[name], kept))
    full = calibration_loss(model, calibration, None, args.eval_batch_size)
    rows.append(("unpruned", "all blocks", full, list(range(depth))))

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / TABLE, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["kind", "name", "calibration_loss", "kept_indices"])
        for kind, name, loss, kept in rows:
            writer.writerow([kind, name, f"{loss:.8g}", " ".join(map(str, kept))])
    values = np.asarray(losses)
    unique = len({tuple(mask_to_indices(m)) for m in masks})
    title = f"{Path(str(args.model).rstrip('/')).name}: {len(values)} random {scheme} masks ({unique} distinct)"
    plot_calibration_histogram(values, marks, args.out / HISTOGRAM, title=title)
    summary = {
        "scheme": str(scheme), "samples": len(values), "distinct": unique, "unpruned": full,
        "random": {"min": float(values.min()), "median": float(np.median(values)), "max": float(values.max())},
        "marks": {name: {"loss": loss, "percentile": float((values < loss).mean() * 100)} for name, loss in marks.items()},
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"random masks: min {values.min():.4g}, median {np.median(values):.4g}, max {values.max():.4g} (unpruned {full:.4g})")
    for name, loss in sorted(marks.items(), key=lambda kv: kv[1]):
        log(f"  {name:<14} {loss:.4g}  ({summary['marks'][name]['percentile']:.1f} % of random masks have a lower loss)")
    log(f"wrote {args.out / HISTOGRAM} and {args.out / TABLE}")
    return 0
