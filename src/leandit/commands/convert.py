"""`leandit convert`: an original DiT/SiT checkpoint or leandit model folder to a diffusers
`DiTTransformer2DModel` folder, and a diffusers DiT folder back to a leandit model folder."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..models import DiT, save_model
from ..models.diffusers_dit import DIFFUSERS_CLASS, DIFFUSERS_TIME_FREQ_SHIFT, diffusers_to_dit, dit_to_diffusers
from .common import add_model_options, open_model

TARGETS = ("diffusers", "leandit")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a DiT between the original/leandit layout and diffusers' DiTTransformer2DModel",
        description="Write SRC in the other layout. --to diffusers: SRC is an original DiT/SiT .pt/.safetensors "
        "file or a leandit model folder; the result is a save_pretrained folder (DiTTransformer2DModel."
        "from_pretrained reads it) plus leandit.json, which records what diffusers' config cannot hold (the "
        "original time-embedding shift, guided channels, objective), so converting back restores the model "
        "exactly. The weights are copied exactly; diffusers computes the timestep features with a frequency "
        "shift of 1 where the original uses 0, so the diffusers model's outputs differ from the original's, "
        "the more the larger t (see benchmarks/convert_dit.md). --to leandit: SRC is a diffusers DiT folder (the result "
        "computes exactly what diffusers computes, or restores the original model when leandit.json says the "
        "weights came from one), or an original checkpoint file (written as a leandit model folder).",
    )
    p.add_argument("src", help="original DiT/SiT checkpoint file, leandit model folder or diffusers DiT folder")
    p.add_argument("--to", choices=TARGETS, required=True, help="the layout to write")
    p.add_argument("--out", type=Path, required=True, help="the folder to write (must not exist, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder (once the new one is complete)")
    p.add_argument(
        "--keep-diffusers-shift",
        action="store_true",
        help="--to leandit: do not restore the time shift recorded in leandit.json (0 for an original DiT); build "
        "the model that computes exactly what the diffusers model computes (shift 1)",
    )
    add_model_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    src, out = Path(args.src), args.out
    if out.exists() and not args.overwrite:
        raise ValueError(f"--out {out} already exists; choose a new folder or pass --overwrite")
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise ValueError(f"--out {out} is the source itself; choose another folder")
    source_model = open_model(args.src, args)  # a checkpoint file, a leandit or diffusers (pipeline) folder
    is_dit = isinstance(source_model, DiT)
    if not is_dit and type(source_model).__name__ != DIFFUSERS_CLASS:
        raise ValueError(f"{src} holds a {type(source_model).__name__}, not a DiT: only DiT converts between the "
                         f"original layout and diffusers' {DIFFUSERS_CLASS}")
    if args.to == "diffusers":
        if not is_dit:
            raise ValueError(f"{src} is already a diffusers DiT; use --to leandit to convert it to leandit's layout")
        target_model = dit_to_diffusers(source_model)
        save_model(target_model, out, overwrite=args.overwrite)
    else:
        extra = None
        if is_dit:
            if src.is_dir():
                raise ValueError(f"{src} is already a leandit model folder; use --to diffusers to convert it")
            target_model = source_model  # an original checkpoint file -> a leandit model folder
        else:
            recorded = dict(getattr(source_model, "leandit_info", None) or {})
            restore = "time_freq_shift" in recorded and not args.keep_diffusers_shift
            if not restore:
                recorded.pop("time_freq_shift", None)
            target_model = diffusers_to_dit(source_model, objective=args.objective, space=args.space, info=recorded)
            extra = {"converted_from": f"diffusers {DIFFUSERS_CLASS} {src}", "time_shift_restored_from_leandit_json": restore}
        save_model(target_model, out, extra=extra, overwrite=args.overwrite)
    report(src, out, args.to, source_model, target_model)
    return 0


def report(src: Path, out: Path, target: str, source_model, target_model) -> None:
    """What was written, and how far the two models' outputs are apart on one random input."""
    dit = target_model if isinstance(target_model, DiT) else source_model
    c = dit.config
    print(f"wrote {out}: {'diffusers DiTTransformer2DModel' if target == 'diffusers' else 'leandit DiT'}, "
          f"{c.depth} blocks, hidden {c.hidden_size}, {c.num_heads} heads, patch {c.patch_size}, "
          f"{c.in_channels} -> {c.out_channels} channels, {c.num_classes} classes, from {src}")
    if source_model is target_model:
        return
    diff = output_difference(source_model, target_model)
    if c.time_freq_shift == DIFFUSERS_TIME_FREQ_SHIFT:
        print(f"check       outputs equal up to float rounding on a random input (max |diff| {diff:.3g})")
    else:
        print(f"check       max |output diff| {diff:.3g} on a random input: the weights are exact, but leandit's model "
              f"uses time shift {c.time_freq_shift:g} (the original's) and diffusers always 1 (see benchmarks/convert_dit.md)")
    channels = c.guided_channels or c.in_channels
    print(f"guidance    leandit guides {channels} of {c.in_channels} channels"
          + ("; diffusers' DiTPipeline guides all" if channels != c.in_channels else ""))


@torch.no_grad()
def output_difference(a, b, seed: int = 0) -> float:
    """max |a(x, t, y) - b(x, t, y)| for one random input at t = 500 (either may be diffusers')."""
    dit = a if isinstance(a, DiT) else b
    c = dit.config
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, c.in_channels, c.input_size, c.input_size, generator=gen)
    t = torch.tensor([0.5 if c.objective == "flow" else 500.0])
    y = torch.tensor([0])
    outs = [m(x, t, y) if isinstance(m, DiT) else m(x, t, y).sample for m in (a, b)]
    return (outs[0] - outs[1]).abs().max().item()

