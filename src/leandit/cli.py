"""The `leandit` command: a thin layer that parses options and calls the library.

Each command lives in `leandit.commands.<name>` with `add_parser(subparsers)` and
`run(args) -> int`. Only the command being run is imported (torch and the rest load in a few
seconds; `leandit --help` and `--version` need none of it). Errors a user can fix (a missing
file, a wrong checkpoint, an option that does not fit) are printed as one line on stderr with
exit status 2; LEANDIT_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Iterable

from . import __version__

COMMANDS = (
    "train", "prune", "finetune", "dynamic", "route", "analyze", "sample", "eval", "bench",
    "extract-features", "encode-prompts", "export-pipeline", "info", "convert", "demo",
)

# The one-line summary `leandit --help` shows without importing the commands; each command's
# own add_parser gives the same text (tests/test_new_user.py checks that they agree).
SUMMARIES = {
    "train": "train or fine-tune a DiT/SiT on its own objective",
    "prune": "depth-prune a model: learnable (TinyFusion) or a baseline; writes the pruned model folder",
    "finetune": "recover a pruned model: fine-tune it with logits KD and masked RepKD from its teacher",
    "dynamic": "make a model dynamic (DyDiT: timestep-wise width, per-token MLP skipping) and fine-tune it to a MAC target",
    "route": "route tokens past blocks with learned ratios per block and timestep region (DiffCR) and fine-tune to a target",
    "analyze": "analyses that guide compression (calibration losses of random masks, massive activations)",
    "sample": "generate images: a PNG grid and an .npz (arr_0 = N x H x W x C uint8, arr_1 = labels)",
    "eval": "FID, sFID, IS, precision and recall of samples against reference images (ADM evaluator definitions)",
    "bench": "speed and cost of models side by side: parameters, FLOPs, latency, images/s, peak memory, speed-up",
    "extract-features": "encode an image folder into VAE latent shards, with class labels or caption embeddings "
    "(the training data of latent models)",
    "encode-prompts": "embed prompts with a local PixArt pipeline's text encoder, for 'leandit sample --prompts'",
    "export-pipeline": "write a diffusers pipeline folder whose transformer is a compressed model (other components from the base)",
    "convert": "convert a DiT between the original/leandit layout and diffusers' DiTTransformer2DModel",
    "info": "architecture, parameter count, FLOPs per forward and compression history of a model",
    "demo": "run the end-to-end demo on the embedded digits teacher and write report.md",
}


def build_parser(full: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser; the commands in `full` (default: all) with their options, the others as
    names only (their modules are not imported)."""
    parser = argparse.ArgumentParser(
        prog="leandit",
        description="Make pretrained diffusion transformers cheaper to run and keep their image quality.",
    )
    parser.add_argument("--version", action="version", version=f"leandit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    full = set(COMMANDS if full is None else full)
    for name in COMMANDS:
        if name in full or name not in SUMMARIES:
            module = importlib.import_module(f".commands.{name.replace('-', '_')}", __package__)
            module.add_parser(sub)
        else:
            sub.add_parser(name, help=SUMMARIES[name], add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)  # the top level has no valued options
    parser = build_parser([command] if command in COMMANDS else [])
    args = parser.parse_args(argv)
    try:
        status = int(args.run(args) or 0)
        sys.stdout.flush()  # here, so that a closed pipe is handled below rather than at exit
        return status
    except KeyboardInterrupt:
        print("leandit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `leandit info X | head`: the reader stopped reading; not an error of the command.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout at exit
        return 0
    except (OSError, ValueError) as err:  # CheckpointError is a ValueError
        if os.environ.get("LEANDIT_DEBUG"):
            raise
        print(f"leandit {args.command}: error: {err} (set LEANDIT_DEBUG=1 for a traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
