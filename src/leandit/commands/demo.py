"""`leandit demo`: the whole story on the embedded digits teacher, on a CPU in minutes."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..demo import check_redo, mar_stage_names, run_demo, run_mar_demo, stage_names
from ..train.distributed import resolve_device
from .common import log

DEFAULT_OUT = {"dit": Path("demo-output"), "mar": Path("demo-output-mar")}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run the end-to-end demo on the embedded digits teacher and write report.md",
        description="Run the whole story on the embedded digits teacher: prune 12 -> 6 blocks with learnable 1:2 "
        "(TinyFusion), ShortGPT and the oracle, recover each with masked KD, make the teacher dynamic at the same half "
        "of its MACs (DyDiT) and route its tokens at half its MACs (DiffCR), sample every model, measure digits-FID and class agreement (before and after recovery for "
        "the pruned ones) and the speed-up side by side over whole sampling runs, and write report.md with one table "
        "and the sample grids. About 9 minutes on a 2-core CPU; finished stages are reused on a rerun. "
        "With --backbone mar, the same story on the embedded digits MAR teacher (TinyMAR): its 6 + 6 encoder/decoder "
        "blocks pruned to 3 + 3 by learnable 1:2 and by ShortGPT, each recovered with masked KD, every model sampled "
        "by MAR's unmasking loop and scored the same way (about 6 minutes on one CPU thread).",
    )
    p.add_argument("--backbone", choices=tuple(DEFAULT_OUT), default="dit",
                   help="dit = the digits DiT teacher (default); mar = the digits MAR teacher (TinyMAR)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default demo-output, or demo-output-mar with --backbone mar)")
    p.add_argument("--redo", action="append", default=[], metavar="STAGE",
                   help="rerun this stage even if its result exists (repeatable; 'all' reruns everything); the stages: "
                   + ", ".join(stage_names()) + "; with --backbone mar: " + ", ".join(mar_stage_names()))
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_redo(args.redo, args.backbone)
    out = args.out if args.out is not None else DEFAULT_OUT[args.backbone]
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: pass a folder for the demo's results")
    demo = run_demo if args.backbone == "dit" else run_mar_demo
    report = demo(out, redo=set(args.redo), device=resolve_device(args.device), progress=not args.quiet, log=log)
    print(f"report written to {report}")
    return 0
