"""A tiny PixArt (diffusers' `PixArtTransformer2DModel`) trained briefly on the embedded digits
with the class names as captions, then pruned 12 -> 6 and recovered with masked KD, all through
leandit's text-conditioned path: digits-FID and class agreement before and after.

    OMP_NUM_THREADS=2 python benchmarks/pixart_digits.py --work runs/pixart-digits

The captions are embedded by a tiny T5 text encoder through the PixArt pipeline's own
`encode_prompt` (a pipeline folder built from configs, as in tests/tiny_pipeline.py: its
encoder is random, so "zero" ... "nine" are ten fixed, distinct embeddings, which is all a
caption has to be here). The model works in pixel space (8 x 8 x 1, patch 2 = 16 tokens),
hidden 64 (4 heads), 12 blocks, learned sigma, like the digits teacher; training, pruning and
recovery run the library's one loop with the same jobs the CLI uses. Finished stages are reused.
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
from torch.utils.data import Dataset

import leandit
from leandit.backbones import backbone
from leandit.compress.depth import LearnablePruningJob, LearnableSettings, export_pruned, make_calibration_set, score_method
from leandit.compress.depth.scheme import global_scheme
from leandit.compress.recovery import RecoveryJob, RecoverySettings, teacher_layers
from leandit.data import digits_dataset
from leandit.data.digits import to_digits_range
from leandit.data.text import PromptEncoder
from leandit.evaluate.digits import class_agreement
from leandit.evaluate.digits_features import digits_as_uint8, load_digits_features
from leandit.evaluate.feature_nets import extract_features
from leandit.evaluate.metrics import all_metrics
from leandit.evaluate.sampling import generate, save_grid, to_uint8_images
from leandit.diffusion import make_objective
from leandit.train import DenoisingJob, LoopConfig, Trainer
from leandit.train.ema import ema_decay_for_steps

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the tiny pipeline builder the tests use
from tiny_pipeline import build_tiny_pipeline  # noqa: E402

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEXT_LENGTH = 8  # tokens per caption: a digit's name and </s> fit


class CaptionedDigits(Dataset):
    """(x, {"text", "text_mask"}) with each digit's caption embedding; `null_condition` = ""."""

    conditioning = "text"

    def __init__(self, embeds: torch.Tensor, masks: torch.Tensor, null: tuple[torch.Tensor, torch.Tensor]):
        self.digits = digits_dataset()
        self.embeds, self.masks = embeds, masks
        self.null_condition = {"text": null[0], "text_mask": null[1]}

    def __len__(self) -> int:
        return len(self.digits)

    def __getitem__(self, i):
        x, y = self.digits[i]
        return x, {"text": self.embeds[int(y)], "text_mask": self.masks[int(y)]}


def pixart(depth: int = 12, seed: int = 0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(num_attention_heads=4, attention_head_dim=16, in_channels=1, out_channels=2,
                                     num_layers=depth, cross_attention_dim=64, norm_num_groups=8, sample_size=8,
                                     patch_size=2, caption_channels=16)
    model.leandit_info = {"objective": "diffusion", "space": "pixel", "name": f"PixArt digits D{depth}"}
    return model


def loop(steps: int, batch: int, lr: float, **fields) -> LoopConfig:
    return LoopConfig(steps=steps, global_batch_size=batch, lr=lr, precision="fp32", log_every=50, checkpoint_every=steps,
                      **fields)


def score(model, data: CaptionedDigits, per_class: int, feature_net, reference, grid: Path) -> dict:
    labels = torch.arange(10 * per_class) % 10
    cond = {"text": data.embeds[labels], "text_mask": data.masks[labels]}
    conditioning = backbone(model).spec.conditioning.with_null(data.null_condition)
    x = generate(model, cond, sampler="ddim", steps=50, seed=0, batch_size=250, progress=False, conditioning=conditioning)
    images = to_uint8_images(x, "pixel")
    save_grid(grid, images[:100], ncols=10)
    metrics = all_metrics(extract_features(feature_net, images, progress=False), reference)
    return {"digits_fid": metrics["fid"], "class_agreement": class_agreement(to_digits_range(x), labels.numpy())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/pixart-digits"))
    parser.add_argument("--train-steps", type=int, default=2500)
    parser.add_argument("--train-batch", type=int, default=64)
    parser.add_argument("--prune-steps", type=int, default=500)
    parser.add_argument("--recover-steps", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=100, help="samples per class for the metrics (default 100)")
    args = parser.parse_args()
    work = args.work
    started = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    pipe = work / "text-pipeline"
    if not (pipe / "model_index.json").exists():
        build_tiny_pipeline(pipe)
    encoder = PromptEncoder(pipe, max_length=TEXT_LENGTH)
    embeds, masks = encoder.encode(NAMES)
    data = CaptionedDigits(embeds, masks, encoder.null())
    feature_net = load_digits_features()
    reference = extract_features(feature_net, digits_as_uint8()[0], progress=False)
    rows: dict[str, dict] = {}
    timings: dict[str, float] = {}

    teacher_dir = work / "teacher" / "model"
    if not teacher_dir.exists():
        t0 = time.perf_counter()
        model = pixart()
        conditioning = backbone(model).spec.conditioning.with_null(data.null_condition)
        job = DenoisingJob(model, make_objective(backbone(model).spec), 0.1, conditioning)
        config = loop(args.train_steps, args.train_batch, 1e-3, warmup_steps=200, lr_schedule="cosine", final_lr_ratio=0.1,
                      ema_decay=0.999, ema_warmup=True)
        result = Trainer(config, work / "teacher", device="cpu").fit(job, data)
        leandit.save_model(model, teacher_dir, ema=result.ema, extra={"trained_steps": result.steps})
        timings["train"] = time.perf_counter() - t0
    teacher = leandit.load_model(teacher_dir)
    rows["teacher (12 blocks)"] = score(teacher, data, args.per_class, feature_net, reference, work / "teacher.png")
    print(json.dumps(rows), flush=True)

    for method in ("learnable 1:2", "shortgpt"):
        slug = method.split()[0]
        pruned_dir = work / f"pruned-{slug}"
        if not pruned_dir.exists():
            t0 = time.perf_counter()
            if method == "shortgpt":
                calibration = make_calibration_set(teacher, data, size=256)
                decision = score_method("shortgpt", teacher, calibration, global_scheme(12, 6), batch_size=64, progress=False)
            else:
                conditioning = backbone(teacher).spec.conditioning.with_null(data.null_condition)
                job = LearnablePruningJob(leandit.load_model(teacher_dir), LearnableSettings(scheme="1:2"), conditioning=conditioning)
                config = loop(args.prune_steps, 64, 1e-4, ema_decay=ema_decay_for_steps(args.prune_steps, maximum=0.999))
                result = Trainer(config, work / f"prune-run-{slug}", device="cpu").fit(job, data)
                decision = job.decision(result.ema, result.steps)
            export_pruned(teacher, decision, pruned_dir, source_name=str(teacher_dir))
            timings[f"prune {method}"] = time.perf_counter() - t0
        student = leandit.load_model(pruned_dir)
        kept = student.compression[-1]["kept_indices"]
        before = score(student, data, args.per_class, feature_net, reference, work / f"pruned-{slug}.png")
        recovered_dir = work / f"recovered-{slug}"
        if not recovered_dir.exists():
            t0 = time.perf_counter()
            layers = teacher_layers(student.compression, teacher.compression, 6, 12)
            conditioning = backbone(student).spec.conditioning.with_null(data.null_condition)
            job = RecoveryJob(student, teacher, RecoverySettings(), layers, conditioning=conditioning)
            config = loop(args.recover_steps, 64, 2e-4, lr_schedule="cosine", final_lr_ratio=0.5,
                          ema_decay=ema_decay_for_steps(args.recover_steps, maximum=0.9999))
            result = Trainer(config, work / f"recover-run-{slug}", device="cpu").fit(job, data)
            leandit.save_model(student, recovered_dir, ema=result.ema)
            timings[f"recover {method}"] = time.perf_counter() - t0
        after = score(leandit.load_model(recovered_dir), data, args.per_class, feature_net, reference,
                      work / f"recovered-{slug}.png")
        rows[f"{method} -> {kept}"] = {"before": before, "after": after}
        print(json.dumps(rows), flush=True)

    lines = [
        "# A tiny PixArt on the digits: trained, pruned 12 -> 6, recovered (text-conditioned path)",
        "",
        f"Machine: {platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads (shared with other jobs), "
        f"torch {torch.__version__}; {time.perf_counter() - started:.0f} s this invocation. Command: "
        f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python benchmarks/pixart_digits.py "
        f"--train-steps {args.train_steps} --train-batch {args.train_batch} --prune-steps {args.prune_steps} --recover-steps {args.recover_steps}`.",
        "",
        f"{10 * args.per_class} samples (DDIM 50, no guidance), digits-FID against the 1797 real digits with the shipped "
        "digits feature net, class agreement by the SVC of the teacher's README.",
        "",
        "| model | digits-FID before recovery | class agreement before | digits-FID after masked KD | class agreement after |",
        "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        if "before" in row:
            b, a = row["before"], row["after"]
            lines.append(f"| {name} | {b['digits_fid']:.2f} | {b['class_agreement'] * 100:.1f} % | {a['digits_fid']:.2f} | "
                         f"{a['class_agreement'] * 100:.1f} % |")
        else:
            lines.append(f"| {name} | – | – | {row['digits_fid']:.2f} | {row['class_agreement'] * 100:.1f} % |")
    if timings:
        lines += ["", "Wall time of the stages run in this invocation: "
                  + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()) + "."]
    (HERE / "pixart_digits.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
