"""The `leandit` command: a thin layer that parses options and calls the library.

Each command lives in `leandit.commands.<name>` with `add_parser(subparsers)` and
`run(args) -> int`. Errors a user can fix (a missing file, a wrong checkpoint, an option
that does not fit) are printed as one line on stderr with exit status 2; LEANDIT_DEBUG=1
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .models.infer import CheckpointError

COMMANDS = (
    "train", "prune", "finetune", "analyze", "sample", "eval", "bench",
    "extract-features", "encode-prompts", "export-pipeline", "info", "convert", "demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leandit",
        description="Make pretrained diffusion transformers cheaper to run and keep their image quality.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f".commands.{name.replace('-', '_')}", __package__)
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("leandit: interrupted", file=sys.stderr)
        return 130
    except (CheckpointError, OSError, ValueError) as err:
        if os.environ.get("LEANDIT_DEBUG"):
            raise
        print(f"leandit {args.command}: error: {err} (set LEANDIT_DEBUG=1 for a traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
