"""`leandit analyze`: looking inside a model before deciding how to compress it.

`analyze calibration`: the calibration loss of K random masks of a scheme as a histogram,
with the baselines and any pruned model's mask marked (TinyFusion Figure 5), plus the raw
numbers as CSV.

`analyze widths`: what a dynamic (DyDiT) model runs: active heads and MLP groups per block
over the timesteps and the measured share of tokens through each MLP (DyDiT Figures 5-6).

`analyze ratios`: what a routed (DiffCR) model runs: the learned kept ratio and capacity k of
every block in every timestep region with the MAC ratio per region, and which tokens the blocks
ran on for a few generated samples (DiffCR's figures).

`analyze activations`: every block's output distribution with its max, min and std
(TinyFusion Figure 8) and the share of activations each outlier threshold k would drop, to
choose k for masked RepKD.
"""

from __future__ import annotations

import argparse
import csv
import io
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
from ..backbones import backbone
from ..compress.depth.scheme import mask_to_indices
from ..data import open_training_data
from ..evaluate.activations import activation_statistics
from ..evaluate.plots import plot_activation_histograms, plot_calibration_histogram
from ..models.blocks import depth_of
from ..files import write_text_atomically
from ..models.io import read_compression
from ..train.distributed import resolve_device
from .common import add_calibration_options, add_model_options, check_data_fits, check_data_option, log, open_model

BASELINES = (*SCORE_METHODS, "oracle")
HISTOGRAM = "calibration_histogram.png"
TABLE = "calibration_losses.csv"
ACTIVATIONS_PLOT = "activations.png"
ACTIVATIONS_TABLE = "activations.csv"
WIDTHS_PLOT = "widths.png"
WIDTHS_TABLE = "widths.csv"
RATIOS_PLOT = "ratios.png"
RATIOS_TABLE = "ratios.csv"
TOKEN_MAPS_PLOT = "token_maps.png"


def add_parser(sub) -> None:
    p = sub.add_parser("analyze", help="analyses that guide compression (calibration losses of random masks, massive activations)")
    inner = p.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True,
                             help="calibration: loss histogram of random masks; activations: block output histograms; "
                             "widths: what a DyDiT model runs over the timesteps; ratios: what a routed (DiffCR) model runs")
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
    add_calibration_options(c)
    c.add_argument("--seed", type=int, default=0, help="seed of the random masks (default 0)")
    c.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    add_model_options(c)
    c.set_defaults(run=run_calibration)

    a = inner.add_parser(
        "activations",
        help="per-block histogram of output activations with max/min/std, to choose masked RepKD's k",
        description="Run MODEL over a fixed calibration set (noised images over the whole timestep range) and write "
        f"{ACTIVATIONS_PLOT} (one log-count histogram per block with its max, min and std; TinyFusion Figure 8), "
        f"{ACTIVATIONS_TABLE} and summary.json: per block the range, std, the largest distance from a sample's mean in "
        "that sample's standard deviations, and the share of activations beyond each k (what masked RepKD would drop).",
    )
    a.add_argument("model", help="model folder or checkpoint file")
    a.add_argument("--out", type=Path, required=True, help=f"folder for {ACTIVATIONS_PLOT}, {ACTIVATIONS_TABLE} and summary.json")
    a.add_argument("--k", default="2,4", help="outlier thresholds in standard deviations to count, comma-separated (default 2,4)")
    a.add_argument("--bins", type=int, default=100, help="histogram bins per block (default 100)")
    add_calibration_options(a)
    a.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    add_model_options(a)
    a.set_defaults(run=run_activations)

    w = inner.add_parser(
        "widths",
        help="active heads and MLP groups per block over the timesteps, and tokens through each MLP, of a DyDiT model",
        description=f"Write {WIDTHS_PLOT}: heat maps of the active attention heads and MLP groups of every block at every "
        "trained timestep (read from the width routers: they depend on t alone) and of the share of tokens each block sends "
        "through its MLP, measured on a calibration set of noised images binned by timestep; "
        f"{WIDTHS_TABLE} holds the widths per block and timestep. Prints a summary per block.",
    )
    w.add_argument("model", help="a dynamic model folder (from `leandit dynamic`)")
    w.add_argument("--out", type=Path, required=True, help=f"folder for {WIDTHS_PLOT} and {WIDTHS_TABLE}")
    w.add_argument("--bins", type=int, default=20, help="timestep bins of the measured token shares (default 20)")
    add_calibration_options(w)
    w.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    add_model_options(w)
    w.set_defaults(run=run_widths)

    r = inner.add_parser(
        "ratios",
        help="learned kept ratio per block and timestep region, and maps of the tokens each block ran on, of a routed model",
        description=f"Write {RATIOS_PLOT}: the share of the tokens every block runs on in every timestep region (its "
        "capacity k from the schedule and the learned ratio) and the MAC ratio of each region against the dense model; "
        f"{RATIOS_TABLE}: one row per block with its learned ratio and k per region; summary.json: the MAC ratios; "
        f"{TOKEN_MAPS_PLOT}: a few samples generated with the model's sampler (no guidance) beside heat maps over the patch "
        "grid of how many blocks ran on each token, at the sampling step nearest the middle of each region and on average "
        "over all steps. Prints the table.",
    )
    r.add_argument("model", help="a routed model folder (from `leandit route`)")
    r.add_argument("--out", type=Path, required=True, help=f"folder for {RATIOS_PLOT}, {RATIOS_TABLE}, {TOKEN_MAPS_PLOT} and summary.json")
    r.add_argument("--samples", type=int, default=4, help="samples of the token maps, class-balanced (default 4; 0: no token maps)")
    r.add_argument("--sampler", default=None, help="sampler of the token maps (default: the model's, ddim or heun)")
    r.add_argument("--sampling-steps", type=int, default=None, help="sampling steps of the token maps (default 50; 250 for ddpm)")
    r.add_argument("--seed", type=int, default=0, help="seed of the samples' noise (default 0)")
    r.add_argument("--vae", type=Path, default=None, help="a latent model's VAE (a local diffusers AutoencoderKL folder, or MAR's kl16.ckpt) to show "
                   "the samples; without one the maps come alone")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    add_model_options(r)
    r.set_defaults(run=run_ratios)


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
    _check_sizes(args)
    check_data_option(args.data)
    dataset = open_training_data(args.data)
    check_data_fits(model, dataset, args.data)
    device = resolve_device(args.device)
    model.to(device)
    calibration = make_calibration_set(model, dataset, args.calibration_size, args.calibration_seed)
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
    _write_csv(args.out / TABLE, ["kind", "name", "calibration_loss", "kept_indices"],
               [[kind, name, f"{loss:.8g}", " ".join(map(str, kept))] for kind, name, loss, kept in rows])
    values = np.asarray(losses)
    unique = len({tuple(mask_to_indices(m)) for m in masks})
    title = f"{Path(str(args.model).rstrip('/')).name}: {len(values)} random {scheme} masks ({unique} distinct)"
    plot_calibration_histogram(values, marks, args.out / HISTOGRAM, title=title)
    summary = {
        "scheme": str(scheme), "samples": len(values), "distinct": unique, "unpruned": full,
        "random": {"min": float(values.min()), "median": float(np.median(values)), "max": float(values.max())},
        "marks": {name: {"loss": loss, "percentile": float((values < loss).mean() * 100)} for name, loss in marks.items()},
    }
    write_text_atomically(args.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    # The results go to stdout (`> table.txt` keeps them); progress and file names to stderr.
    print(f"random masks: min {values.min():.4g}, median {np.median(values):.4g}, max {values.max():.4g} (unpruned {full:.4g})")
    for name, loss in sorted(marks.items(), key=lambda kv: kv[1]):
        print(f"  {name:<14} {loss:.4g}  ({summary['marks'][name]['percentile']:.1f} % of random masks have a lower loss)")
    log(f"wrote {args.out / HISTOGRAM} and {args.out / TABLE}")
    return 0


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    write_text_atomically(path, text.getvalue())


def _check_plot_options(args: argparse.Namespace) -> None:
    """--bins, --out and the calibration sizes of an analysis that writes a plot folder."""
    if args.bins < 1:
        raise ValueError(f"--bins must be at least 1, got {args.bins}")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is a file: pass a folder")
    _check_sizes(args)


def _check_sizes(args: argparse.Namespace) -> None:
    for option in ("calibration_size", "eval_batch_size"):
        if getattr(args, option) < 1:
            raise ValueError(f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}")


def _thresholds(text: str) -> list[float]:
    try:
        ks = [float(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise ValueError(f"--k takes comma-separated numbers, e.g. 2,4; got {text!r}") from None
    if not ks or any(k <= 0 for k in ks):
        raise ValueError(f"--k needs positive thresholds, got {text!r}")
    return ks


def run_activations(args: argparse.Namespace) -> int:
    ks = _thresholds(args.k)
    _check_plot_options(args)
    model = open_model(args.model, args)
    check_data_option(args.data)
    dataset = open_training_data(args.data)
    check_data_fits(model, dataset, args.data)
    model.to(resolve_device(args.device))
    calibration = make_calibration_set(model, dataset, args.calibration_size, args.calibration_seed)
    layers = activation_statistics(model, calibration, ks, args.bins, args.eval_batch_size)
    args.out.mkdir(parents=True, exist_ok=True)
    _write_csv(args.out / ACTIVATIONS_TABLE, ["block", "min", "max", "mean", "std", "max_sigma", *[f"beyond_{k:g}_sigma" for k in ks]],
               [[layer.layer, *[f"{v:.6g}" for v in (layer.min, layer.max, layer.mean, layer.std, layer.max_sigma)],
                 *[f"{layer.beyond[k]:.6g}" for k in ks]] for layer in layers])
    summary = {"model": str(args.model), "calibration_size": args.calibration_size, "k": ks, "blocks": [l.summary() for l in layers]}
    write_text_atomically(args.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    title = f"{Path(str(args.model).rstrip('/')).name}: block outputs over {args.calibration_size} calibration images"
    plot_activation_histograms(layers, args.out / ACTIVATIONS_PLOT, title=title, k=ks)
    print(f"{'block':>5} {'min':>10} {'max':>10} {'std':>9} {'max sigma':>9}  " + "  ".join(f"> {k:g} sigma" for k in ks))
    for layer in layers:
        print(f"{layer.layer:>5} {layer.min:>10.4g} {layer.max:>10.4g} {layer.std:>9.4g} {layer.max_sigma:>9.1f}  "
            + "  ".join(f"{layer.beyond[k] * 100:>8.3f} %" for k in ks))
    log(f"wrote {args.out / ACTIVATIONS_PLOT}, {args.out / ACTIVATIONS_TABLE} and summary.json")
    return 0


def run_widths(args: argparse.Namespace) -> int:
    from ..evaluate.plots import plot_widths
    from ..evaluate.widths import measure_token_shares, width_profile

    _check_plot_options(args)
    model = open_model(args.model, args)
    profile = width_profile(model)  # refuses a model that is not dynamic, before any work
    if backbone(model).outer.settings.tokens:
        check_data_option(args.data)
        dataset = open_training_data(args.data)
        check_data_fits(model, dataset, args.data)
        model.to(resolve_device(args.device))
        calibration = make_calibration_set(model, dataset, args.calibration_size, args.calibration_seed)
        profile.token_bins, profile.token_share = measure_token_shares(model, calibration, args.bins, args.eval_batch_size)
    args.out.mkdir(parents=True, exist_ok=True)
    _write_csv(args.out / WIDTHS_TABLE, ["block", "timestep", "heads", "groups"], profile.rows())
    path = Path(str(args.model).rstrip("/"))
    name = f"{path.parent.name}/{path.name}" if path.name == "model" and path.parent.name else path.name
    plot_widths(profile, args.out / WIDTHS_PLOT, title=f"{name}: what each block runs")
    tokens = profile.token_share
    print(f"{'block':>5} {'heads (mean)':>12} {'groups (mean)':>13} {'tokens through MLP':>18}")
    for layer in range(profile.heads.shape[0]):
        share = f"{np.nanmean(tokens[layer]) * 100:>17.1f}%" if tokens is not None else f"{'all':>18}"
        print(f"{layer:>5} {profile.heads[layer].mean():>12.2f} {profile.groups[layer].mean():>13.2f} {share}")
    log(f"wrote {args.out / WIDTHS_PLOT} and {args.out / WIDTHS_TABLE}")
    return 0


def run_ratios(args: argparse.Namespace) -> int:
    from ..backbones import backbone as adapter_of
    from ..evaluate.plots import plot_ratios, plot_token_maps
    from ..evaluate.ratios import ratio_profile, region_centres, token_maps

    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is a file: pass a folder")
    if args.samples < 0:
        raise ValueError(f"--samples must be 0 or more, got {args.samples}")
    if args.sampling_steps is not None and args.sampling_steps < 1:
        raise ValueError(f"--sampling-steps must be at least 1, got {args.sampling_steps}")
    model = open_model(args.model, args)
    profile = ratio_profile(model)  # refuses a model that does not route tokens, before any work
    spec = adapter_of(model).spec
    vae = None
    if args.samples:
        from ..evaluate.sampling import check_sampling_options, default_sampling_steps

        sampler = check_sampling_options(spec, args.sampler, 1.0)
        steps = args.sampling_steps if args.sampling_steps is not None else default_sampling_steps(sampler)
        if spec.conditioning.kind != "class":
            raise ValueError(f"token maps sample class-conditional models only (this one is {spec.conditioning.describe()}); "
                             "pass --samples 0 for the ratio plot alone")
        if args.vae is not None:
            if spec.space != "latent":
                raise ValueError(f"--vae applies to latent-space models; this model is in {spec.space} space")
            from ..data.vae import load_vae

            vae = load_vae(args.vae, resolve_device(args.device))
    model.to(resolve_device(args.device))
    args.out.mkdir(parents=True, exist_ok=True)
    _write_csv(args.out / RATIOS_TABLE, profile.header(), profile.rows())
    summary = {"model": str(args.model), **profile.summary()}
    path = Path(str(args.model).rstrip("/"))
    name = f"{path.parent.name}/{path.name}" if path.name == "model" and path.parent.name else path.name
    plot_ratios(profile, args.out / RATIOS_PLOT,
                title=f"{name}: tokens per block and timestep region, {summary['macs_ratio']:.1%} of the dense MACs")
    written = [RATIOS_PLOT, RATIOS_TABLE]
    if args.samples:
        maps = token_maps(model, args.samples, seed=args.seed, steps=steps, sampler=sampler, vae=vae)
        centres = region_centres(profile)
        chosen = maps.nearest_steps(centres)
        labels = [f"t = {maps.timesteps[s]:.3g} ({region})" for s, region in zip(chosen, profile.region_labels())]
        plot_token_maps(maps, chosen, args.out / TOKEN_MAPS_PLOT, step_labels=labels,
                        title=f"{name}: blocks (of {maps.depth}) that ran on each token, {sampler} {steps} steps")
        summary["token_maps"] = {"samples": args.samples, "sampler": sampler, "steps": steps, "seed": args.seed,
                                 "shown_timesteps": [float(maps.timesteps[s]) for s in chosen],
                                 "mean_blocks_per_token": round(float(maps.counts.mean()), 3)}
        written.append(TOKEN_MAPS_PLOT)
    write_text_atomically(args.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    regions = profile.region_labels()
    print(f"{'block':>5} " + " ".join(f"{label:>14}" for label in regions))
    for layer in range(profile.depth):
        print(f"{layer:>5} " + " ".join(f"{f'k={profile.schedule[layer, g]} ({profile.ratios[layer, g]:.2f})':>14}"
                                        for g in range(profile.regions)))
    print(f"{'MACs':>5} " + " ".join(f"{v * 100:>13.1f}%" for v in profile.macs_ratio_per_region))
    log(f"wrote {', '.join(str(args.out / f) for f in written)} and summary.json")
    return 0
