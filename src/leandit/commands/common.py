"""Options and helpers shared by several commands."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .. import __version__
from ..files import write_text_atomically
from torch import nn

from ..backbones import Conditioning, backbone
from ..evaluate.model_specs import open_spec
from ..models.config import OBJECTIVES, SPACES
from ..train.loop import PRECISIONS, LoopConfig


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """How to read a model argument: a model folder, a DiT/SiT checkpoint file or a name."""
    group = parser.add_argument_group("reading the model")
    group.add_argument(
        "--weights",
        choices=("auto", "ema", "model"),
        default="auto",
        help="which weights of a folder or training checkpoint to use; auto = EMA when present (default: auto)",
    )
    group.add_argument(
        "--num-heads",
        type=int,
        default=None,
        help="attention heads of a checkpoint whose hidden size is not a standard DiT size (384/768/1024/1152)",
    )
    group.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default=None,
        help="what a checkpoint file was trained for: diffusion (DiT) or flow (SiT); default: flow if the file name contains 'SiT'",
    )
    group.add_argument(
        "--space",
        choices=SPACES,
        default=None,
        help="latent (SD-VAE latents) or pixel space, for checkpoint files; default: latent for 4 input channels",
    )
    group.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow a checkpoint file that pickles arbitrary Python objects (runs code from the file: only for files you trust)",
    )


def open_model(spec: str, args: argparse.Namespace, device="cpu", allow_random: bool = False) -> nn.Module:
    """A model from a folder, checkpoint file or shipped name; a named size ("DiT-XL/2",
    "DiT-XL/2:depth=14") gives random weights when `allow_random` (for speed and size
    questions). device="meta" builds a named size without memory or initialisation."""
    return open_spec(
        spec,
        allow_random=allow_random,
        device=device,
        weights=args.weights,
        num_heads=args.num_heads,
        objective=args.objective,
        space=args.space,
        trust_checkpoint=args.trust_checkpoint,
    )


def add_calibration_options(group) -> None:
    """The fixed calibration set of the depth baselines and analyses."""
    group.add_argument("--data", default="digits", help="'digits' or a folder of latent shards (default digits)")
    group.add_argument("--calibration-size", type=int, default=256, help="images in the calibration set (default 256)")
    group.add_argument("--calibration-seed", type=int, default=0, help="seed of the calibration noise (default 0)")
    group.add_argument("--eval-batch-size", type=int, default=64, help="batch size of calibration forward passes (default 64)")


def add_run_options(group, checkpoint_every: int, precision_help: str = "") -> None:
    """The training-loop options every training command shares (not the optimiser's)."""
    group.add_argument("--precision", choices=PRECISIONS, default="auto",
                       help=f"auto = bf16 autocast on GPUs that support it{precision_help}; bf16 also runs on CPUs, "
                            "fast where they have native bf16 (default auto)")
    group.add_argument("--compile", action="store_true",
                       help="run the training forward (and a teacher's) through torch.compile: slower start, faster steps")
    group.add_argument("--checkpoint-every", type=int, default=checkpoint_every, help=f"steps between checkpoints (default {checkpoint_every})")
    group.add_argument("--log-every", type=int, default=10, help="steps between metrics.jsonl lines (default 10)")
    group.add_argument("--stop-after", type=int, default=None, help="end this invocation after N more steps (resumable)")
    group.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes (default 0)")


def loop_config(args: argparse.Namespace, **fields: Any) -> LoopConfig:
    """The loop settings of a training command: the options every training command shares
    (steps, batch size, lr, clipping and add_run_options'), then the command's own `fields`."""
    shared = dict(
        steps=args.steps,
        global_batch_size=args.batch_size,
        lr=args.lr,
        grad_clip=args.grad_clip or None,
        precision=args.precision,
        compile=args.compile,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        seed=args.seed,
        num_workers=args.num_workers,
    )
    return LoopConfig(**{**shared, **fields})


def parse_ema_decay(value: str, auto: Callable[[], float]) -> float | None:
    """An --ema-decay value: a number (0 = no EMA) or 'auto' (the command's rule for its
    length, asked only then)."""
    if value == "auto":
        return auto()
    try:
        decay = float(value)
    except ValueError:
        raise ValueError(f"--ema-decay takes a number or 'auto', got {value!r}") from None
    return decay or None


def plural(count: int, word: str, words: str | None = None) -> str:
    """"1 part", "3 parts": a count with its noun."""
    return f"{count:,} {word if count == 1 else (words or word + 's')}"


def si(value: float, unit: str = "", digits: int = 1) -> str:
    """A number with the SI prefix that shows it: "118.6 G", "0.4 M" -> "415.2 k", "12"."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:,.{digits}f} {prefix}{unit}"
    return f"{value:,.{digits}f} {unit}".rstrip() if value != int(value) else f"{int(value):,} {unit}".rstrip()


def duration(seconds: float) -> str:
    """"42.3 s", "3.5 min", "2.1 h": a time in the unit that shows it."""
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_data_fits(model, dataset, name: str, named_size: bool = False) -> None:
    """Refuse data the model cannot take, saying everything that must change at once: for a
    named size (trained from scratch) the --set overrides that size it from the data, for a
    loaded model the data that fits it."""
    x, _ = dataset[0]
    spec = backbone(model).spec
    kind = getattr(dataset, "conditioning", "class")
    if kind != spec.conditioning.kind:
        what = {"class": "class labels", "text": "captions (text embeddings)"}
        raise ValueError(
            f"data {name} is conditioned on {what.get(kind, kind)} but the model on {spec.conditioning.describe()}; "
            + ("pass captioned data from 'leandit extract-features --pipeline'" if spec.conditioning.kind == "text"
               else "pass class-labelled data")
        )
    space = "pixel" if name == "digits" else "latent"
    shape = tuple(x.shape)  # (C, H, W)
    wrong: list[tuple[str, str, str]] = []  # (what differs, the data's, the field to --set with its value)
    if spec.space != space:
        wrong.append((f"is in {space} space but the model is set up for {spec.space} space", "space", space))
    if shape != spec.input_shape:
        wrong.append((f"has items of shape {shape} but the model takes {spec.input_shape}", "", ""))
        if shape[0] != spec.input_shape[0]:
            wrong.append(("", "in_channels", str(shape[0])))
        if shape[1:] != spec.input_shape[1:]:
            wrong.append(("", "input_size", str(shape[1])))
    if kind == "text":
        width = dataset[0][1]["text"].shape[-1]
        if width != spec.conditioning.dim:
            wrong.append((f"has text embeddings of width {width} but the model takes {spec.conditioning.dim} (extract the "
                          "captions with the text encoder of this model's pipeline)", "", ""))
    else:
        classes = getattr(dataset, "num_classes", None) or (int(dataset.tensors[1].max()) + 1 if hasattr(dataset, "tensors") else None)
        model_classes = spec.conditioning.num_classes
        # More classes than the data has are fine for a loaded model, a waste for a new one.
        if classes is not None and (classes > model_classes or (named_size and classes != model_classes)):
            wrong.append((f"has {classes} classes but the model has {model_classes}", "num_classes", str(classes)))
    if not wrong:
        return
    what = "; ".join(w for w, _, _ in wrong if w)
    if named_size:
        fix = "size the model from the data: add " + " ".join(f"--set {f}={v}" for _, f, v in wrong if f)
    elif spec.space == "pixel":
        fix = "pass --data digits (or data made for this model)"
    elif spec.space != space:
        fix = "pass --data with a folder of latent shards from extract-features"
    else:
        fix = "pass --data made for this model (same resolution and VAE)"
    raise ValueError(f"data {name} {what}; {fix}")


def check_data_option(data: str) -> None:
    """Refuse a --data that cannot be training data, before any work, in the user's words."""
    if data == "digits":
        return
    path = Path(data)
    if path.is_file():
        raise ValueError(f"--data {data} is a file; pass 'digits' or a folder of latent shards written by 'leandit extract-features'")
    if not path.exists():
        raise FileNotFoundError(f"data not found: --data {data} does not exist; pass 'digits' or a folder of latent shards "
                                "written by 'leandit extract-features'")


def data_conditioning(model, dataset) -> Conditioning:
    """The model's conditioning, with the data's empty prompt when the data is captioned
    (label dropout of a text model needs it)."""
    conditioning = backbone(model).spec.conditioning
    null = getattr(dataset, "null_condition", None)
    if conditioning.kind == "text" and null is not None:
        return conditioning.with_null(null)
    return conditioning


RUN_MARKER = "leandit-run.json"
# What leandit's run folders hold (prune, finetune, train): a folder holding only these (and no
# marker yet: made by an older leandit) is taken as one of leandit's run folders; one with a
# decision.json as the result of the prune method that file names.
RUN_OUTPUTS = {RUN_MARKER, "model", "checkpoints", "metrics.jsonl", "run.json", "decision.json", "decisions.png"}


def add_overwrite_option(parser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an --out that holds other files or another command's (method's) result, "
                        "replacing leandit's outputs there (a user's other files are kept)")


def claim_out(out: Path, kind: dict[str, Any], overwrite: bool = False, write: bool = True) -> None:
    """Make `out` this run's folder, or refuse: a file, a folder holding a user's files, or the
    result of another command or method (recognised by leandit's marker) is never written over
    unless `overwrite`, which deletes only leandit's own outputs there. `kind` names the run
    ({"command": "prune", "method": "shortgpt"}): the same kind reruns or resumes in place."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: pass a folder for the run")
    marker = out / RUN_MARKER
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    marked = marker.exists()
    earlier = None
    if marked:
        try:
            earlier = json.loads(marker.read_text())
        except json.JSONDecodeError:
            earlier = {}
    elif "decision.json" in entries:
        earlier = _kind_from_decision(out / "decision.json")
    if not overwrite:
        if earlier is not None and earlier != kind:
            raise ValueError(f"--out {out} holds the result of `{_describe_kind(earlier)}`, not of `{_describe_kind(kind)}`: "
                             "pass a new --out, or --overwrite to replace it")
        foreign = [name for name in entries if name not in RUN_OUTPUTS and not name.startswith(".")]
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise ValueError(f"--out {out} holds files leandit did not write ({shown}): pass a new or empty folder, "
                             "or --overwrite to write into it")
    if not write:
        return
    if overwrite and earlier != kind:
        import shutil

        for name in RUN_OUTPUTS & set(entries):  # the earlier run's outputs only, never the user's files
            path = out / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    if earlier != kind or not marked:
        write_text_atomically(marker, json.dumps(kind, indent=2) + "\n")


def _kind_from_decision(path: Path) -> dict[str, Any] | None:
    """The kind of a prune folder an older leandit wrote (no marker): its decision.json names
    the method ("random-min-loss" is `--method random`). None when it does not say."""
    try:
        method = json.loads(path.read_text()).get("method")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(method, str) or not method:
        return None
    return {"command": "prune", "method": method.partition("-")[0]}


def _describe_kind(kind: dict[str, Any]) -> str:
    words = ["leandit", str(kind.get("command", "?"))]
    if kind.get("method"):
        words.append(f"--method {kind['method']}")
    return " ".join(words)


# The options behind run.json's setting names, for messages.
SETTING_OPTIONS = {"model_overrides": "--set", "model": "--model", "teacher_layers": "the teacher alignment (--teacher-layers/--align)"}


def check_resume(out: Path, settings: dict[str, Any], model, keys: tuple[str, ...]) -> None:
    """Refuse to resume a run whose checkpoints were made with another setup: `keys` of the
    settings (those that shape what is trained, e.g. --scheme) or the model's architecture
    differ from the first invocation's in run.json. Says what differs, before any work."""
    from ..train.checkpoint import latest_checkpoint

    path = Path(out) / "run.json"
    if latest_checkpoint(Path(out)) is None or not path.exists():
        return
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return  # nothing to compare with; the loop's own checks still apply
    earlier, now = record.get("settings", {}), json.loads(json.dumps(settings))
    differences = [
        f"{SETTING_OPTIONS.get(k, '--' + k.replace('_', '-'))} {_shown(earlier.get(k))} (now {_shown(now.get(k))})"
        for k in keys if k in earlier and earlier.get(k) != now.get(k)
    ]
    saved_config, config = record.get("model_config") or {}, json.loads(json.dumps(backbone(model).describe()))
    # A field the saved record lacks is newer than the run (its default is what the run used);
    # only fields both know can differ.
    differences += [f"model {k}={_shown(saved_config.get(k))} (now {_shown(config.get(k))})"
                    for k in sorted(set(saved_config) & set(config)) if k != "name" and saved_config.get(k) != config.get(k)]
    if differences:
        raise ValueError(f"cannot resume {out}: its checkpoints were made with {', '.join(differences)}; "
                         "use the same options to continue it, or a new --out")


def _shown(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def write_run_record(out: Path, settings: dict[str, Any], model, world_size: int) -> None:
    """run.json: the settings the run started with; each later invocation (a resume) is
    appended to "invocations", so the record says what every part of the run used."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: pass a folder for the run")
    out.mkdir(parents=True, exist_ok=True)
    invocation = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "settings": settings,
        "world_size": world_size,
        "leandit": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    path = out / "run.json"
    record = json.loads(path.read_text()) if path.exists() else {"settings": settings, "model_config": backbone(model).describe()}
    record.setdefault("invocations", []).append(invocation)
    write_text_atomically(path, json.dumps(record, indent=2) + "\n")
