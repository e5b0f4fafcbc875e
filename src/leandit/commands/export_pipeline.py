"""`leandit export-pipeline`: a whole diffusers pipeline folder around a compressed transformer,
the other components taken from the base pipeline, so `DiffusionPipeline.from_pretrained`
generates with it."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..backbones import backbone
from ..files import write_folder_atomically
from ..models.io import COMPRESSION_FILE, identify_folder
from ..models.infer import CheckpointError
from .common import add_model_options, log, open_model

# Config fields of diffusers transformers that hold block indices: pruning changes what they
# mean, so they are re-indexed to the kept blocks (a removed block's entry is dropped).
INDEX_FIELDS = ("dual_attention_layers",)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export-pipeline",
        help="write a diffusers pipeline folder whose transformer is a compressed model (other components from the base)",
        description="Write OUT, a diffusers pipeline folder: BASE_PIPELINE's components (VAE, text encoder, tokenizer, "
        "scheduler, model_index.json) with MODEL (a compressed diffusers transformer folder written by leandit) as its "
        "transformer/, saved with save_pretrained so that DiffusionPipeline.from_pretrained(OUT) generates with it. "
        "Files of the base are hard-linked where possible (no second copy of a 9 GB text encoder), copied otherwise. "
        "The transformer keeps leandit's compression.json beside it.",
    )
    p.add_argument("base_pipeline", type=Path, help="the pipeline the model was compressed from (a local folder with model_index.json)")
    p.add_argument("model", help="the compressed transformer: a diffusers model folder written by leandit (prune/finetune output)")
    p.add_argument("--out", type=Path, required=True, help="the new pipeline folder (must not exist yet)")
    add_model_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    base = args.base_pipeline
    if not (base / "model_index.json").is_file():
        raise ValueError(f"{base} is not a diffusers pipeline folder (no model_index.json): pass the pipeline the model came from")
    if args.out.exists():
        raise ValueError(f"--out {args.out} exists: pass a new folder")
    index = json.loads((base / "model_index.json").read_text())
    if "transformer" not in index or not (base / "transformer").is_dir():
        raise ValueError(f"{base} has no transformer component to replace")
    base_transformer, _ = identify_folder(base)
    model = open_model(args.model, args)
    adapter = backbone(model)
    if adapter.model_type != "diffusers":
        raise ValueError(f"{args.model} is a {adapter.spec.family} model, not a diffusers transformer: convert it first "
                         "('leandit convert --to diffusers')")
    base_class = json.loads((base_transformer / "config.json").read_text()).get("_class_name")
    if type(model).__name__ != base_class:
        raise ValueError(f"{args.model} is a {type(model).__name__} but {base} holds a {base_class}: pass the pipeline it came from")
    kept = _kept_blocks(model)
    reindex_config(model, kept)

    def write(tmp: Path) -> None:
        for entry in sorted(base.iterdir()):
            if entry.name == "transformer":
                continue
            _link_tree(entry, tmp / entry.name)
        model.save_pretrained(str(tmp / "transformer"), safe_serialization=True)
        history = getattr(model, "compression", None) or []
        if history:
            (tmp / "transformer" / COMPRESSION_FILE).write_text(json.dumps(history, indent=2) + "\n")

    write_folder_atomically(args.out, write)
    log(f"pipeline written to {args.out}: {base.name}'s components with the {adapter.spec.depth}-block transformer of {args.model}"
        + (f" (kept blocks {kept} of the original)" if kept is not None else ""))
    return 0


def _kept_blocks(model) -> list[int] | None:
    """Which blocks of the original model this one runs, composed over its pruning history."""
    from ..compress.recovery.alignment import layer_origins, pruning_records

    history = getattr(model, "compression", None) or []
    if not pruning_records(history):
        return None
    return layer_origins(history, backbone(model).spec.depth)


def reindex_config(model, kept: list[int] | None) -> dict[str, Any]:
    """Re-index config fields that hold block indices to the kept blocks; returns the changes."""
    changes: dict[str, Any] = {}
    for name in INDEX_FIELDS:
        value = model.config.get(name) if hasattr(model.config, "get") else None
        if not value:
            continue
        if kept is None:
            raise ValueError(f"the transformer's {name} holds block indices but its history does not say which blocks were "
                             "kept: export from a model pruned by leandit")
        changes[name] = [kept.index(i) for i in value if i in kept]
    if changes:
        model.register_to_config(**changes)
    return changes


def _link_tree(source: Path, target: Path) -> None:
    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    if source.is_dir():
        shutil.copytree(source, target, copy_function=link_or_copy)
    else:
        link_or_copy(str(source), str(target))


__all__ = ["add_parser", "reindex_config", "run"]
