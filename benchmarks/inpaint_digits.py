"""Inpainting on the embedded digits: the digits teacher fine-tuned as an inpainting model with
`leandit train --inpaint`, completing the held-out digits with half of each one masked, before
and after token routing (`leandit route --target 0.5`, DiffCR).

    OMP_NUM_THREADS=1 python benchmarks/inpaint_digits.py --work runs/inpaint-digits

Every held-out digit (the 450 of the digits feature net's 25 % split, `--images digits`) is
completed four times, with its left, right, top and bottom half unknown (1800 completions per
model; `leandit sample MODEL --inpaint KIND --images digits`, 50 DDIM steps, no guidance,
seed 0), once given its label and once with the null class (the digit must then come from the
known half). Scores: class agreement (the SVC fitted on the real digits names the digit of each
completion; agreement with its true label), digits-FID of the 1800 completions against the 1797
real digits (as `leandit eval --ref digits`), and the unknown pixels' RMS distance to the
original's. Rows: the originals and the masked inputs (bounds), the base teacher used naively
(replacement of the known half of x_t before every step), the zero-initialised variant (step 0:
the teacher, known half pasted at the end), the inpainting fine-tune (`--steps 100,400` scores its checkpoints too), and the final
model routed to half the block tokens (`leandit route` of an inpainting model fine-tunes on the
masks it was trained with). Finished runs are reused;
`--report` rewrites the table only.

The teacher was trained on all 1797 digits, the held-out 450 included, and so is the
inpainting fine-tune (`--data digits`): "held out" is the feature net's split, not images the
diffusion models never saw.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

import leandit
from leandit.cli import main as leandit_main
from leandit.evaluate.digits import class_agreement
from leandit.evaluate.digits_features import digits_as_uint8, load_digits_features
from leandit.evaluate.feature_nets import extract_features
from leandit.evaluate.inpainting import load_images, masks_for, replacement_inpaint, save_inpainting_grid, to_model_space
from leandit.evaluate.metrics import all_metrics
from leandit.evaluate.sampling import to_uint8_images
from leandit.models.inpaint import InpaintModel, parse_masks

HERE = Path(__file__).resolve().parent
HALVES = ("left", "right", "top", "bottom")


def cli(*args: str) -> float:
    started = time.perf_counter()
    if leandit_main(list(args)) != 0:
        raise RuntimeError(f"leandit {' '.join(args)} failed")
    return time.perf_counter() - started


def scores(images: np.ndarray, labels: np.ndarray, originals: np.ndarray, masks: torch.Tensor, feature_net, reference) -> dict:
    """Class agreement, digits-FID and the unknown pixels' RMS distance to the originals (on the
    0..1 scale) of uint8 completions (N, 8, 8, 1) with their true labels."""
    digits = images[..., 0].astype(np.float32) * 16.0 / 255.0  # the 0..16 scale of the data
    fid = all_metrics(extract_features(feature_net, images, progress=False), reference)["fid"]
    unknown = masks.permute(0, 2, 3, 1).numpy() > 0  # (N, 8, 8, 1)
    error = (images.astype(np.float64) - originals.astype(np.float64))[unknown] / 255.0
    return {"class_agreement": class_agreement(digits, labels), "digits_fid": fid, "unknown_rmse": float(np.sqrt((error**2).mean()))}


def halves_of(images: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """The four half masks of every image: (4N, 1, 8, 8) masks in HALVES order, and the image order."""
    masks = torch.cat([masks_for(parse_masks(kind, 8), range(len(images)), 0) for kind in HALVES])
    return masks, np.tile(np.arange(len(images)), len(HALVES))


def sampled(model: Path, images: str, out: Path, batch: int) -> tuple[np.ndarray, float]:
    """The 1800 completions of `model` by `leandit sample --inpaint` (HALVES order), and the seconds it took."""
    parts, seconds = [], 0.0
    for kind in HALVES:
        folder = out / kind
        if not (folder / "samples.npz").exists():
            seconds += cli("sample", str(model), "--inpaint", kind, "--images", images, "--out", str(folder), "--steps", "50",
                           "--batch-size", str(batch), "--part-size", "450", "--grid", "40", "--quiet")
        parts.append(np.load(folder / "samples.npz")["arr_0"])
    return np.concatenate(parts), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/inpaint-digits"))
    parser.add_argument("--steps", default="400", help="checkpoints of the inpainting fine-tune to score, e.g. 100,400 (default 400)")
    parser.add_argument("--batch-size", type=int, default=64, help="fine-tuning batch size (default 64)")
    parser.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate (default 1e-4, train's default)")
    parser.add_argument("--route-steps", type=int, default=300, help="steps of `leandit route --target 0.5` (default 300)")
    parser.add_argument("--report", action="store_true", help="only write the table from finished runs")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    store_file = work / "results.json"
    store = json.loads(store_file.read_text()) if store_file.exists() else {}
    steps = [int(s) for s in args.steps.split(",")]
    if not args.report:
        started = time.perf_counter()
        run(args, work, store, store_file, steps)
        store["total_seconds"] = time.perf_counter() - started
        store_file.write_text(json.dumps(store, indent=2))
    write_report(store, args, HERE / "inpaint_digits.md")


def run(args, work: Path, store: dict, store_file: Path, steps: list[int]) -> None:
    feature_net = load_digits_features()
    reference = extract_features(feature_net, digits_as_uint8()[0], progress=False)
    images, labels = load_images("digits")  # (450, 8, 8, 1) uint8, (450,)
    masks, order = halves_of(images)
    originals, truth = images[order], labels[order]  # (1800, 8, 8, 1), (1800,)
    unlabelled = work / "held-out-no-label.npz"  # the same images with the null class as their label
    np.savez(unlabelled, arr_0=images, arr_1=np.full_like(labels, 10))
    score = lambda completions: scores(completions, truth, originals, masks, feature_net, reference)  # noqa: E731

    def save(name: str, row: dict) -> None:
        store[name] = {**store.get(name, {}), **row}
        store_file.write_text(json.dumps(store, indent=2))
        print(name, store[name], flush=True)

    if "originals" not in store:
        save("originals", {"label": score(originals)})
    if "masked input, unknown half black" not in store:
        black = np.where(masks.permute(0, 2, 3, 1).numpy() > 0, 0, originals).astype(np.uint8)
        save("masked input, unknown half black", {"label": score(black)})
    teacher = leandit.load_model("digits-teacher")
    if "teacher, replacement (naive)" not in store:
        row = {}
        for key, y in (("label", truth), ("no_label", np.full_like(truth, 10))):
            x = replacement_inpaint(teacher, to_model_space(originals), masks, torch.from_numpy(y), steps=50, seed=0, batch_size=450)
            row[key] = score(to_uint8_images(x, "pixel"))
        save("teacher, replacement (naive)", row)

    def inpainting_row(name: str, folder: Path, slug: str) -> None:
        if name in store:
            return
        row = {}
        for key, spec in (("label", "digits"), ("no_label", str(unlabelled))):
            completions, seconds = sampled(folder, spec, work / "samples" / slug / key, 450)
            row[key] = {**score(completions), "sample_seconds": seconds}
        save(name, row)

    run_dir = work / "inpaint"
    last = max(steps)
    if not (run_dir / "model" / "config.json").exists():
        store["train_seconds"] = cli("train", "--model", "digits-teacher", "--data", "digits", "--inpaint", "mixed", "--steps",
                                     str(last), "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--ema-decay", "0",
                                     "--checkpoint-every", str(min(steps)), "--keep-checkpoints", "0", "--out", str(run_dir),
                                     "--quiet")
    step0 = work / "step-0"
    if not step0.exists():
        leandit.save_model(InpaintModel(leandit.load_model("digits-teacher")), step0)
    inpainting_row("inpainting, 0 steps (= the teacher, known half pasted)", step0, "step-0")
    for step in steps:
        folder = run_dir / "model" if step == last else run_dir / "checkpoints" / f"step-{step:07d}"
        inpainting_row(f"inpainting, {step} steps", folder, f"step-{step}")
    final = run_dir / "model"
    done = sampled(final, "digits", work / "samples" / f"step-{last}" / "label", 450)[0]
    pick = np.concatenate([np.arange(k * 450, k * 450 + 10) for k in range(len(HALVES))])  # 10 digits per half
    save_inpainting_grid(HERE / "inpaint_digits.png", originals[pick], masks[pick, 0].numpy(), done[pick], columns=10)

    if route_exists():
        routed = work / "routed"
        if not (routed / "model" / "config.json").exists():
            store["route_seconds"] = cli("route", str(final), "--target", "0.5", "--steps", str(args.route_steps),
                                         "--batch-size", str(args.batch_size), "--out", str(routed), "--quiet")
        inpainting_row(f"inpainting {last} steps, routed (--target 0.5, {args.route_steps} steps)", routed / "model", "routed")
    store["machine"] = machine()
    store_file.write_text(json.dumps(store, indent=2))


def machine() -> str:
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}"


def route_exists() -> bool:
    from leandit.cli import COMMANDS

    return "route" in COMMANDS


def write_report(store: dict, args, path: Path) -> None:
    cell = lambda r: f"{r['class_agreement']:.1%} | {r['digits_fid']:.2f} | {r['unknown_rmse']:.3f}" if r else "– | – | –"  # noqa: E731
    lines = [
        "# Inpainting on the digits teacher: half of each held-out digit masked",
        "",
        f"Machine: {store.get('machine') or machine()}. Command: `OMP_NUM_THREADS=1 python benchmarks/inpaint_digits.py` "
        + (f"({store['total_seconds'] / 60:.1f} min). " if "total_seconds" in store else "(a partial run: the rows below). ") + f"Fine-tuning: `leandit train --model digits-teacher --data digits "
        f"--inpaint mixed --batch-size {args.batch_size} --lr {args.lr:g} --ema-decay 0` "
        f"({store.get('train_seconds', 0):.0f} s for {max(int(s) for s in args.steps.split(','))} steps).",
        "",
        "| 450 held-out digits x 4 halves unknown | with the label: class agreement | digits-FID | unknown RMSE "
        "| without a label: class agreement | digits-FID | unknown RMSE |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in store.items():
        if isinstance(row, dict) and "label" in row:
            lines.append(f"| {name} | {cell(row['label'])} | {cell(row.get('no_label'))} |")
    lines += [
        "",
        "Each of the 450 held-out digits (the digits feature net's 25 % split) is completed with its left, right, top and "
        "bottom half unknown: 1800 completions per row, 50 DDIM steps, no guidance, seed 0, by `leandit sample MODEL "
        "--inpaint KIND --images digits` (known pixels pasted back). *With the label*: the model is given the digit's "
        "class; *without*: the null class, so the digit must come from the known half. Class agreement: the SVC fitted on "
        "the real digits assigns the completion to the digit's true class. digits-FID: the shipped digits feature net, "
        "1800 completions against the 1797 real digits. Unknown RMSE: the unknown pixels' root-mean-square distance to the "
        "original's (0..1 scale; a plausible completion need not be the original, but a lower value says the known half "
        "was used). `originals` and `masked input` bound the scale; `teacher, replacement` is the base model used naively "
        "(before every step the known half of x_t is replaced by the known half noised to that step); `inpainting, 0 "
        "steps` is the zero-initialised variant, i.e. the teacher generating a digit and the known half pasted over it.",
        "",
        "The teacher was trained on all 1797 digits and the inpainting fine-tune uses them too (`--data digits`): "
        "\"held out\" is the feature net's split, not images the diffusion models never saw.",
        "",
        "![masked input (unknown red) / completion / original, with the label; 10 digits per half](inpaint_digits.png)",
        "",
    ]
    path.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
