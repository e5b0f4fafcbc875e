"""`leandit info`: what a model is: architecture, parameters, FLOPs, what was compressed."""

from __future__ import annotations

import argparse
import json

from ..compress.recovery.alignment import layer_origins, pruning_records
from ..models.summary import describe
from ..backbones import backbone
from ..models.inpaint import inpaint_layer
from ..models.io import is_named_size
from .common import add_model_options, open_model, si


def add_parser(sub) -> None:
    p = sub.add_parser(
        "info",
        help="architecture, parameter count, FLOPs per forward and compression history of a model",
        description="Describe a model folder, a DiT/SiT checkpoint file or a named size (e.g. DiT-XL/2). "
        "FLOPs count 2 per multiply-accumulate, attention included; the DiT paper's 'Gflops' are the MACs.",
    )
    p.add_argument("model", help="model folder, checkpoint file (.pt/.safetensors) or named size")
    p.add_argument("--batch-size", type=int, default=1, help="batch size of the counted forward pass (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_model_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    model = open_model(args.model, args, device="meta" if is_named_size(args.model) else "cpu", allow_random=True)
    info = describe(model, args.batch_size)
    inpaint = inpaint_layer(model)
    if inpaint is not None:
        info["inpainting"] = inpaint.summary()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    adapter = backbone(model)
    c = adapter.spec
    config = getattr(adapter.model, "config", None)
    mlp = f", MLP x{config.mlp_ratio:g}" if hasattr(config, "mlp_ratio") else ""
    print(f"model       {info['source']}")
    mar = info.get("mar")
    if mar is not None:
        _print_mar_network(mar, c, info, mlp)
    else:
        print(f"network     {c.family}, {c.depth} blocks, hidden {c.hidden_size}, {c.num_heads} heads{mlp}, "
              f"patch {c.patch_size}, {info['tokens']} tokens")
    print(f"input       {c.in_channels} x {c.input_size} x {c.input_size} ({c.space} space), conditioned on {c.conditioning.describe()}")
    if mar is not None:
        h = mar["head"]
        print(f"objective   masked tokens (MAR): each unknown token denoised by the head on a {h['timesteps']}-step cosine "
              f"schedule with learned sigma ({h['sampling_steps']} respaced steps when sampling)")
    else:
        print(f"objective   {c.objective}" + (" with learned sigma" if c.learn_sigma else ""))
    if inpaint is not None:
        s = info["inpainting"]
        print(f"inpainting  an inpainting variant: {s['extra_channels']} extra input channels through a patch embedding of "
              f"{s['parameters']:,} parameters ({s['mask_convention']}); fine-tuned on masks: {s['trained_masks'] or 'none yet'}")
    print(f"parameters  {info['parameters']:,} ({si(info['parameters'], digits=2)}) "
          f"+ {info['fixed_position_embedding']:,} fixed position-embedding values")
    dynamic = info.get("dynamic")
    if mar is not None:
        p = mar["parameters"]
        print(f"            encoder blocks {si(p['encoder_blocks'], digits=2)}, decoder blocks {si(p['decoder_blocks'], digits=2)}, "
              f"head {si(p['head'], digits=2)}, embeddings and norms {si(p['other'], digits=2)}")
        g = mar["generation"]
        m = g["macs_per_image"]
        print(f"generation  {si(m['total'], 'MACs', 3)} per image ({g['num_iter']} iterations, {g['head_steps']} head steps; "
              f"twice with guidance): blocks {m['blocks'] / m['total']:.1%}, head {m['head'] / m['total']:.1%}, "
              f"embeddings {m['other'] / m['total']:.1%}")
        print(f"compute     {si(info['macs_per_forward'], 'MACs', 3)} = {si(info['flops_per_forward'], 'FLOPs', 3)} "
              f"per training forward at batch {args.batch_size} (the median mask ratio, each unknown token once in the head)")
    else:
        print(f"compute     {si(info['macs_per_forward'], 'MACs', 3)} = {si(info['flops_per_forward'], 'FLOPs', 3)} "
              f"per forward at batch {args.batch_size}" + (" with every head, channel and token on" if dynamic else ""))
    if dynamic and dynamic.get("method") == "DiffCR":
        settings = dynamic["settings"]
        regions = settings["regions"]
        per_region = ", ".join(f"{v:.1%}" for v in dynamic["macs_ratio_per_region"])
        print(f"routing     DiffCR token routing, {dynamic['macs_ratio']:.1%} of the MACs on average over {regions} timestep "
              f"region{'s' if regions > 1 else ''} ({per_region}; region 1 = t nearest the data for DiT, the noise for SiT), "
              f"scale {settings['scale']}, {settings['multiplier']} multiplier"
              + (", skipped tokens as keys/values" if settings["skipped_kv"] else "")
              + (" (around DyDiT: at full width; its narrower widths save more, `leandit bench --trajectory` counts both)"
                 if dynamic.get("around") == "DyDiT" else ""))
        kept = ", ".join(f"{v:g}" for v in dynamic["mean_kept_per_layer"])
        print(f"tokens      mean kept tokens per block (of {dynamic['tokens']}): {kept}"
              + ("" if dynamic["frozen"] else " (ratios not frozen: their nearest bins)"))
    elif dynamic:
        heads = ", ".join(f"{v:g}" for v in dynamic["mean_heads_per_layer"])
        groups = ", ".join(f"{v:g}" for v in dynamic["mean_groups_per_layer"])
        print(f"dynamic     DyDiT ({dynamic['dynamic']}): {dynamic['width_macs_ratio_all_tokens']:.1%} of the MACs on average over "
              "the trained timesteps with every token through the MLP (token skipping saves more; `leandit bench "
              "--trajectory` measures it)")
        print(f"widths      mean heads per block (of {dynamic['heads']}): {heads}")
        print(f"            mean MLP groups per block (of {dynamic['groups']}): {groups}")
    history = info["compression"]
    if not history:
        print("compression none (an uncompressed model)")
    for i, record in enumerate(history, 1):
        method = record.get("method", "?")
        kept = record.get("kept_indices")
        line = f"compression {i}. {method}"
        if kept is not None:
            line += f": kept {len(kept)} of {record.get('source_depth', '?')} blocks {kept}"
            by_list = record.get("kept_by_list")
            if isinstance(by_list, dict) and len(by_list) > 1:
                line += " (" + ", ".join(f"{name} {indices}" for name, indices in by_list.items()) + ")"
        elif method == "dydit":
            line += f": target {record.get('target')} of the MACs ({record.get('steps', '?')} steps, --mix {record.get('loss', {}).get('mix', '?')})"
        elif method == "diffcr":
            line += (f": {record.get('target', 0):.0%} {'fewer MACs' if record.get('training', {}).get('budget') == 'macs' else 'fewer block tokens'} "
                     f"targeted ({record.get('steps', '?')} steps, --mix {record.get('loss', {}).get('mix', '?')})")
        elif method == "recovery":
            line += f" ({record.get('loss', {}).get('mix', '?')}, {record.get('steps', '?')} steps)"
            if record.get("teacher"):
                line += f", teacher {record['teacher']}"
        if record.get("source") and method != "recovery":
            line += f" from {record['source']}"
        print(line)
    if pruning_records(history):
        print(f"origins     its blocks are blocks {layer_origins(history, c.depth)} of the original model")
    return 0


def _print_mar_network(mar: dict, c, info: dict, mlp: str) -> None:
    e, d, h = mar["encoder"], mar["decoder"], mar["head"]
    print(f"network     {c.family}, {c.depth} blocks: encoder {e['depth']} (hidden {e['hidden_size']}, {e['heads']} heads) + "
          f"decoder {d['depth']} (hidden {d['hidden_size']}, {d['heads']} heads){mlp}, patch {c.patch_size}, "
          f"{info['tokens']} tokens + {mar['buffer_size']} buffer")
    print(f"head        diffusion MLP: {h['depth']} residual blocks of width {h['width']} per token "
          f"(x{h['batch_mul']} noise draws per token in training)")
