"""Options and helpers shared by several commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..models import NAMED_CONFIGS, DiT, build_model, load_model
from ..models.config import OBJECTIVES, SPACES


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


def open_model(spec: str, args: argparse.Namespace, device="cpu", allow_random: bool = False) -> DiT:
    """A model from a folder or checkpoint file; a named config ("DiT-XL/2") gives random
    weights when `allow_random` (for speed and size questions). device="meta" builds a named
    size without memory or initialisation, for counting."""
    if spec in NAMED_CONFIGS:
        if not allow_random:
            raise ValueError(f"{spec!r} is a named size with random weights; pass a model folder or checkpoint file")
        if str(device) == "meta":
            with torch.device("meta"):
                return build_model(spec)
        return build_model(spec).to(device)
    if not Path(spec).exists():
        raise FileNotFoundError(
            f"model not found: {spec} (pass a model folder, a DiT/SiT .pt/.safetensors file"
            + (f", or a named size such as {', '.join(list(NAMED_CONFIGS)[:4])}, ...)" if allow_random else ")")
        )
    return load_model(
        spec,
        weights=args.weights,
        num_heads=args.num_heads,
        objective=args.objective,
        space=args.space,
        trust_checkpoint=args.trust_checkpoint,
        device=device,
    )


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
