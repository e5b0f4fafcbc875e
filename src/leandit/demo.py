"""The end-to-end story on the embedded digits teacher, as stages that are reused when rerun.

Prune the 12-block teacher to 6 blocks with learnable 1:2 (TinyFusion) and two baselines
(ShortGPT, oracle), recover each with masked KD, make it dynamic at half its MACs (DyDiT) and
route its tokens at half its MACs (DiffCR), sample every model, measure digits-FID and class agreement (before and after recovery for
the pruned ones), measure speed side by side over whole sampling runs, and write
`report.md` with one table and the sample grids. Pruning, recovery and DyDiT run through
the same commands a user runs (`leandit prune`, `leandit finetune`, `leandit dynamic`,
`leandit route`), in process.

`run_mar_demo` is the same story on the embedded digits MAR teacher (TinyMAR): its 6 + 6
encoder/decoder blocks pruned to 3 + 3 by learnable 1:2 beside a baseline, both recovered
with masked KD, every model sampled by MAR's unmasking loop and scored the same way.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .assets import digits_mar_teacher_path, digits_teacher_path
from .backbones import backbone
from .cli import main as leandit_main
from .data.digits import to_digits_range
from .diffusion import PerSampleNoise
from .evaluate.digits import class_agreement
from .evaluate.digits_features import digits_as_uint8, load_digits_features
from .evaluate.feature_nets import extract_features
from .evaluate.metrics import all_metrics
from .evaluate.sampling import generate, make_labels, save_grid, save_npz, to_uint8_images
from .evaluate.speed import measure_speed
from .files import write_text_atomically
from .models import load_model
from .models.summary import describe

# Sampling settings of the demo (chosen by measurement: see the teacher's README.md).
SAMPLER = "ddim"
CFG_SCALE = 1.0


@dataclass(frozen=True)
class DemoSettings:
    """How much work each stage does; the defaults fit in 10 minutes on a 2-core CPU."""

    prune_steps: int = 800
    recover_steps: int = 250
    dynamic_steps: int = 250
    dynamic_target: float = 0.5
    route_steps: int = 120
    route_target: float = 0.5  # of the MACs removed (`leandit route --budget macs`)
    batch_size: int = 64
    samples_per_class: int = 100
    sampling_steps: int = 50
    bench_rounds: int = 3
    bench_trajectory: int = 8


@dataclass
class Stages:
    """Run named stages once; a stage's result is kept in `state.json` and reused on a
    rerun unless its settings changed or `redo` names it (or "all")."""

    folder: Path
    redo: set[str] = field(default_factory=set)
    log: Callable[[str], None] = print

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "state.json"
        self.state = json.loads(self.path.read_text()) if self.path.exists() else {}

    def stamp(self, name: str) -> str:
        """When stage `name` last finished: part of the settings of the stages that use its
        output, so that a rerun of it reruns them too."""
        return self.state[name]["finished"]

    def run(self, name: str, settings: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        cached = self.state.get(name)
        if cached and cached["settings"] == settings and not ({name, "all"} & self.redo):
            self.log(f"[{name}] reusing the result from {cached['finished']} (pass --redo {name} to run it again)")
            return cached["result"]
        self.log(f"[{name}] running ...")
        started = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - started
        self.state[name] = {
            "settings": settings,
            "result": result,
            "seconds": round(seconds, 2),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        write_text_atomically(self.path, json.dumps(self.state, indent=2) + "\n")
        self.log(f"[{name}] done in {seconds:.1f} s")
        return result


PRUNINGS = {  # name -> the prune command's method options (12 -> 6 blocks)
    "learnable 1:2": ["--method", "learnable", "--scheme", "1:2"],
    "ShortGPT": ["--method", "shortgpt", "--keep", "6"],
    "oracle": ["--method", "oracle", "--keep", "6"],
}


def stage_names() -> list[str]:
    """Every stage of the demo, in order: the names `--redo` takes (besides "all")."""
    names = ["teacher", "sample-teacher"]
    for name in PRUNINGS:
        slug = _slug(name)
        names += [f"prune-{slug}", f"recover-{slug}", f"sample-{slug}-pruned", f"sample-{slug}-recovered"]
    return [*names, "dynamic-dydit", "sample-dydit", "route-diffcr", "sample-diffcr", "speed"]


def check_redo(redo, backbone_name: str = "dit") -> None:
    """Refuse a --redo stage the demo does not have (it would silently rerun nothing)."""
    names = stage_names() if backbone_name == "dit" else mar_stage_names()
    unknown = sorted(set(redo) - {*names, "all"})
    if unknown:
        raise ValueError(f"--redo {unknown[0]}: no such stage; the stages are {', '.join(names)} (or all)")


def run_demo(
    out: Path,
    *,
    redo: set[str] = frozenset(),
    device: str = "cpu",
    progress: bool = True,
    log=print,
    settings: DemoSettings = DemoSettings(),
) -> Path:
    """Run (or reuse) every stage and write `out/report.md`; returns its path."""
    check_redo(redo)
    started = time.perf_counter()
    stages = Stages(Path(out), set(redo), log)
    folder = stages.folder
    if stages.state.get("teacher", {}).get("result", {}).get("family") == "MAR":
        raise ValueError(f"--out {folder} holds the MAR demo's results: pass another folder (the DiT demo's default is "
                         "demo-output)")
    teacher_dir = digits_teacher_path()
    teacher = load_model(teacher_dir, device=device)
    # Settings name the teacher's weights by hash, so a rebuilt teacher reruns every stage.
    teacher_id = _file_hash(teacher_dir / "model.safetensors")
    info = stages.run("teacher", {"model": teacher_id}, lambda: describe(teacher))
    quiet = [] if progress else ["--quiet"]
    s = settings
    feature_net = load_digits_features()
    reference = extract_features(feature_net, digits_as_uint8()[0], progress=False)

    def sample_and_score(name: str, model_dir: Path) -> dict[str, Any]:
        model = load_model(model_dir, device=device)
        spec = backbone(model).spec
        classes = spec.conditioning.num_classes
        labels = make_labels(s.samples_per_class * classes, classes)
        x = generate(model, labels, sampler=SAMPLER, steps=s.sampling_steps, cfg_scale=CFG_SCALE, seed=0, batch_size=250,
                     progress=progress)
        scores = _save_and_score(folder, name, x, to_uint8_images(x, spec.space), labels, classes, feature_net, reference)
        return scores | {"description": describe(model)}

    sample = {"per_class": s.samples_per_class, "sampler": SAMPLER, "steps": s.sampling_steps, "cfg_scale": CFG_SCALE, "seed": 0}
    rows = {"teacher": {"after": stages.run("sample-teacher", {"model": teacher_id, **sample},
                                            lambda: sample_and_score("teacher", teacher_dir))}}
    rows.update(_prune_and_recover(stages, PRUNINGS, teacher_dir, teacher_id, s, device, quiet, sample, sample_and_score))

    # Methods fine-tuned from the teacher in one go: (row name, stage, command and its method options, steps).
    one_go = [
        (f"DyDiT {s.dynamic_target:g}", "dynamic-dydit", ["dynamic", "--target", f"{s.dynamic_target:g}"], s.dynamic_steps),
        (f"DiffCR {s.route_target:g}", "route-diffcr", ["route", "--target", f"{s.route_target:g}", "--budget", "macs"],
         s.route_steps),
    ]
    for name, stage, command, steps in one_go:
        out_dir = folder / stage

        def make(out_dir=out_dir, command=command, steps=steps) -> dict[str, Any]:
            shutil.rmtree(out_dir, ignore_errors=True)
            _cli(command[0], str(teacher_dir), *command[1:], "--steps", str(steps), "--batch-size", str(s.batch_size),
                 "--out", str(out_dir), "--device", str(device), *quiet)
            return {"model": str(out_dir / "model")}

        stages.run(stage, {"model": teacher_id, "command": command, "steps": steps, "batch_size": s.batch_size}, make)
        sample_stage = "sample-" + stage.split("-")[1]
        rows[name] = {"one_go": command[0], "after": stages.run(
            sample_stage, {stage: stages.stamp(stage), **sample},
            lambda out_dir=out_dir, name=name: sample_and_score(name, out_dir / "model"))}

    def speed() -> dict[str, Any]:
        models = [("teacher", teacher)] + [(name, load_model(folder / f"recover-{_slug(name)}" / "model", device=device)) for name in PRUNINGS]
        models += [(name, load_model(folder / stage / "model", device=device)) for name, stage, _, _ in one_go]
        results = measure_speed(models, 250, cfg_scale=CFG_SCALE, sampling_steps=s.sampling_steps, warmup=1, rounds=s.bench_rounds,
                                device=device, trajectory_steps=s.bench_trajectory)
        return {r.name: r.to_dict() for r in results}

    speeds = stages.run("speed", {"models": [teacher_id, *[stages.stamp(f"recover-{_slug(n)}") for n in PRUNINGS],
                                             *[stages.stamp(stage) for _, stage, _, _ in one_go]], "batch": 250,
                                  "rounds": s.bench_rounds, "trajectory": s.bench_trajectory}, speed)
    report = folder / "report.md"
    write_text_atomically(report, _report(info, rows, speeds, s, time.perf_counter() - started))
    return report


def _cli(*args: str) -> None:
    if leandit_main(list(args)) != 0:
        raise RuntimeError(f"leandit {' '.join(args)} failed")


def _slug(name: str) -> str:
    return name.split()[0].lower() if name != "teacher" else "teacher"  # "DyDiT 0.5" -> "dydit", "DiffCR 0.5" -> "diffcr"


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _report(info: dict, rows: dict, speeds: dict, s: DemoSettings, seconds: float) -> str:
    lines = [
        "# leandit demo report",
        "",
        f"The embedded digits teacher ({info['architecture']['depth']} blocks, hidden {info['architecture']['hidden_size']}, "
        f"{info['parameters'] / 1e6:.2f} M parameters, {info['tokens']} tokens) pruned to 6 blocks three ways and recovered "
        f"with masked KD for {s.recover_steps} steps at batch {s.batch_size} (`leandit finetune --mix masked-kd`; the learnable "
        f"mask from {s.prune_steps} steps of `leandit prune --method learnable --scheme 1:2`"
        + (f", lowest group confidence {rows['learnable 1:2']['lowest_confidence']:.2f}: a short run; "
           "benchmarks/depth_pruning_digits.md has the 2000-step decision" if rows.get("learnable 1:2", {}).get("lowest_confidence") else "")
        + f"), and made dynamic at the same MACs instead: DyDiT (`leandit dynamic --target {s.dynamic_target:g}`, width "
        f"routers on the timestep and token routers before each MLP, fine-tuned {s.dynamic_steps} steps at batch "
        f"{s.batch_size} on its own loss), or given token routing at half the MACs: DiffCR (`leandit route --target "
        f"{s.route_target:g} --budget macs`, a router and a learned kept ratio per block and timestep region, fine-tuned "
        f"{s.route_steps} steps at batch {s.batch_size} on its own loss; inference runs each block on its scheduled top-k tokens).",
        "",
        "| method | blocks kept | params | MFLOPs / image / step | digits-FID before recovery | digits-FID after | "
        "class agreement after | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        after = row["after"]
        d = after["description"]
        before = f"{row['before']['digits_fid']:.2f}" if "before" in row else "–"
        if row.get("one_go") == "dynamic":
            kept = f"all {d['architecture']['depth']}, dynamic width and tokens"
        elif row.get("one_go") == "route":
            kept = f"all {d['architecture']['depth']}, on routed tokens"
        else:
            kept = str(row["kept"]) if "kept" in row else f"all {d['architecture']['depth']}"
        flops = speeds[name]["flops_per_step"] / 250 / 1e6
        lines.append(f"| {name} | {kept} | {d['parameters'] / 1e6:.2f} M | {flops:.2f} | {before} | "
                     f"{after['digits_fid']:.2f} | {after['class_agreement']:.1%} | {speeds[name]['speedup']:.2f}x |")
    lines += [
        "",
        f"digits-FID: the Frechet distance of a small CNN's features (shipped in `assets/digits-features`, 98.0 % held-out "
        f"accuracy) between {rows['teacher']['after']['samples']} class-balanced samples ({SAMPLER}, {s.sampling_steps} steps, "
        f"no guidance) and the 1797 real digits: comparable among these models only, not with Inception FID. Class "
        "agreement: the share of samples an SVC trained on the real digits puts in the class asked for. FLOPs and speed-up: "
        f"whole {s.bench_trajectory}-step {SAMPLER} sampling runs at batch 250 on this machine, every model timed in turn "
        f"({s.bench_rounds} interleaved rounds); latency and FLOPs are means per step, a dynamic or routed model's FLOPs counted "
        "from the heads, channels and tokens it ran (its routers included). DyDiT and DiffCR are fine-tuned in one go, so they "
        "have no 'before'.",
        "",
        "Samples, one class per column (first 10 of each class):",
        "",
        "| " + " | ".join(rows) + " |",
        "|" + "---|" * len(rows),
        "| " + " | ".join(f"![{name}]({row['after']['grid']})" for name, row in rows.items()) + " |",
        "",
        f"Demo time (this run; stages reused from earlier runs count as 0): {seconds:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


# -- the MAR demo (TinyMAR on the embedded digits MAR teacher) ---------------------------------

# How the MAR models are sampled (chosen by measurement on the teacher: its README.md). The
# head's DDPM runs on the stride-20 timesteps 980, 960, ..., 0 ("ddim50" spacing): the
# default respacing starts at t = 999, where the cosine schedule's alpha_bar is 2.4e-9: its
# first step (999 -> 989) multiplies the head's epsilon error by sqrt(alpha_bar(989) /
# alpha_bar(999)) = 316 (980 -> 960: by 2), and this small head's samples fall apart.
MAR_SAMPLING = {"num_iter": 8, "cfg_scale": 2.0, "temperature": 1.0, "head_steps": "ddim50"}

MAR_PRUNINGS = {  # name -> the prune command's method options (6 + 6 -> 3 + 3 blocks)
    "learnable 1:2": ["--method", "learnable", "--scheme", "1:2"],
    "ShortGPT": ["--method", "shortgpt", "--keep", "6"],
}


@dataclass(frozen=True)
class MarDemoSettings:
    """How much work each stage of the MAR demo does; the defaults fit in 10 minutes on a
    2-core CPU."""

    prune_steps: int = 800  # training and samples as benchmarks/tinymar_digits.py's
    recover_steps: int = 400
    batch_size: int = 64
    samples_per_class: int = 100
    num_iter: int = MAR_SAMPLING["num_iter"]
    cfg_scale: float = MAR_SAMPLING["cfg_scale"]
    temperature: float = MAR_SAMPLING["temperature"]
    head_steps: int | str | None = MAR_SAMPLING["head_steps"]

    def sampling(self) -> dict[str, Any]:
        return {"num_iter": self.num_iter, "cfg_scale": self.cfg_scale, "temperature": self.temperature,
                "head_steps": self.head_steps}


def mar_stage_names() -> list[str]:
    """Every stage of the MAR demo, in order: the names `--redo` takes (besides "all")."""
    names = ["teacher", "sample-teacher"]
    for name in MAR_PRUNINGS:
        slug = _slug(name)
        names += [f"prune-{slug}", f"recover-{slug}", f"sample-{slug}-pruned", f"sample-{slug}-recovered"]
    return names


def mar_samples(model, labels, *, num_iter: int, cfg_scale: float, temperature: float, head_steps: int | str | None,
                seed: int = 0, batch_size: int = 250, device: str = "cpu"):
    """Samples (N, C, H, W) of a MAR model for labels (N,) by its unmasking loop; image i gets
    the noise of (seed, i) whatever the batch size."""
    import torch

    model.eval()
    chunks = []
    for start in range(0, len(labels), batch_size):
        y = labels[start:start + batch_size].to(device)
        noise = PerSampleNoise(seed, range(start, start + len(y)), device)
        chunks.append(backbone(model).generate(y, noise, num_iter=num_iter, cfg_scale=cfg_scale, temperature=temperature,
                                               head_steps=head_steps).float().cpu())
    return torch.cat(chunks)


def mar_generation_macs(model, *, num_iter: int, cfg_scale: float, head_steps: int | str | None, **_: Any) -> dict[str, int]:
    """MACs of generating one image with these settings (guidance doubles every call): "blocks"
    (the encoder and decoder blocks: what depth pruning shrinks), "head" (its DDPM on every
    token), "other" and "total" (`leandit.models.flops.mar_generation_macs`)."""
    from .diffusion.gaussian import space_timesteps
    from .models.flops import mar_generation_macs as count

    c = model.config
    steps = c.head_sampling_steps if head_steps is None else len(space_timesteps(c.head_timesteps, head_steps))
    return count(model, 1, num_iter=num_iter, head_steps=steps, guided=cfg_scale != 1.0)


def _mar_info(model) -> dict[str, Any]:
    c = model.config
    return {"family": "MAR", "parameters": sum(p.numel() for p in model.parameters()), "encoder_depth": c.encoder_depth,
            "decoder_depth": c.decoder_depth, "hidden_size": c.hidden_size, "tokens": c.num_tokens,
            "head": f"{c.head_depth} x {c.head_width}"}


def run_mar_demo(
    out: Path,
    *,
    redo: set[str] = frozenset(),
    device: str = "cpu",
    progress: bool = True,
    log=print,
    settings: MarDemoSettings = MarDemoSettings(),
) -> Path:
    """Run (or reuse) every stage of the MAR demo and write `out/report.md`; returns its path."""
    check_redo(redo, "mar")
    started = time.perf_counter()
    stages = Stages(Path(out), set(redo), log)
    folder = stages.folder
    other = stages.state.get("teacher", {}).get("result", {})
    if stages.state and other.get("family") != "MAR":
        raise ValueError(f"--out {folder} holds the DiT demo's results: pass another folder (the MAR demo's default is "
                         "demo-output-mar)")
    teacher_dir = digits_mar_teacher_path()
    teacher = load_model(teacher_dir, device=device)
    teacher_id = _file_hash(teacher_dir / "model.safetensors")
    info = stages.run("teacher", {"model": teacher_id}, lambda: _mar_info(teacher))
    quiet = [] if progress else ["--quiet"]
    s = settings
    feature_net = load_digits_features()
    reference = extract_features(feature_net, digits_as_uint8()[0], progress=False)

    def sample_and_score(name: str, model_dir: Path) -> dict[str, Any]:
        model = load_model(model_dir, device=device)
        classes = model.config.num_classes
        labels = make_labels(s.samples_per_class * classes, classes)
        begun = time.perf_counter()
        x = mar_samples(model, labels, **s.sampling(), device=device)
        seconds = time.perf_counter() - begun
        scores = _save_and_score(folder, name, x, to_uint8_images(x, "pixel"), labels, classes, feature_net, reference)
        return scores | {"sampling_seconds": round(seconds, 2), "info": _mar_info(model),
                         "macs": mar_generation_macs(model, **s.sampling())}

    sample = {"per_class": s.samples_per_class, **s.sampling(), "seed": 0}
    rows = {"teacher": {"after": stages.run("sample-teacher", {"model": teacher_id, **sample},
                                            lambda: sample_and_score("teacher", teacher_dir))}}
    rows.update(_prune_and_recover(stages, MAR_PRUNINGS, teacher_dir, teacher_id, s, device, quiet, sample, sample_and_score))
    report = folder / "report.md"
    write_text_atomically(report, _mar_report(info, rows, s, time.perf_counter() - started))
    return report




def _save_and_score(folder: Path, name: str, x: torch.Tensor, images: np.ndarray, labels: torch.Tensor, classes: int,
                    feature_net: Any, reference: Any) -> dict[str, Any]:
    """Write a model's samples (npz and a one-class-per-column grid) and score them: digits
    metrics against the real digits and class agreement."""
    # "oracle pruned" and "oracle recovered" must not share files: the pruned ones say so.
    slug = _slug(name) + ("-pruned" if name.endswith(" pruned") else "")
    save_npz(folder / f"{slug}_samples.npz", images, labels.numpy())
    save_grid(folder / f"{slug}_grid.png", images[: 10 * classes], ncols=classes,  # one class per column
              column_labels=[str(c) for c in range(classes)])
    metrics = all_metrics(extract_features(feature_net, images, progress=False), reference)
    return {"digits_" + k: v for k, v in metrics.items()} | {
        "class_agreement": class_agreement(to_digits_range(x), labels.numpy()), "samples": len(labels),
        "grid": f"{slug}_grid.png",
    }

def _prune_and_recover(stages: "Stages", prunings: dict[str, list[str]], teacher_dir: Path, teacher_id: str, s: Any,
                       device: str, quiet: list[str], sample: dict[str, Any],
                       sample_and_score: Callable[[str, Path], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Both demos' pruning rows: for each method `leandit prune` the teacher, `leandit finetune
    --mix masked-kd` the result, and sample and score both (each a reusable stage)."""
    folder = stages.folder
    rows: dict[str, dict[str, Any]] = {}
    for name, method in prunings.items():
        slug = _slug(name)
        learnable = method[1] == "learnable"
        prune_args = [*method, *(["--steps", str(s.prune_steps), "--batch-size", str(s.batch_size)] if learnable else [])]
        prune_dir, recover_dir = folder / f"prune-{slug}", folder / f"recover-{slug}"

        def prune(prune_args=prune_args, prune_dir=prune_dir) -> dict[str, Any]:
            shutil.rmtree(prune_dir, ignore_errors=True)  # a rerun starts afresh, not from old checkpoints
            _cli("prune", str(teacher_dir), *prune_args, "--out", str(prune_dir), "--device", str(device), *quiet)
            decision = json.loads((prune_dir / "decision.json").read_text())
            confidences = [g["confidence"] for g in decision.get("groups") or [] if "confidence" in g]
            return {"kept": decision["kept_indices"], "lowest_confidence": min(confidences) if confidences else None}

        def recover(prune_dir=prune_dir, recover_dir=recover_dir) -> dict[str, Any]:
            shutil.rmtree(recover_dir, ignore_errors=True)
            _cli("finetune", str(prune_dir / "model"), "--teacher", str(teacher_dir), "--mix", "masked-kd",
                 "--steps", str(s.recover_steps), "--batch-size", str(s.batch_size), "--out", str(recover_dir),
                 "--device", str(device), *quiet)
            return {"model": str(recover_dir / "model")}

        pruned = stages.run(f"prune-{slug}", {"model": teacher_id, "args": prune_args}, prune)
        stages.run(f"recover-{slug}", {"pruned": stages.stamp(f"prune-{slug}"), "steps": s.recover_steps, "batch_size": s.batch_size,
                                       "mix": "masked-kd"}, recover)
        rows[name] = {
            "kept": pruned["kept"],
            "lowest_confidence": pruned.get("lowest_confidence"),
            "before": stages.run(f"sample-{slug}-pruned", {"pruned": stages.stamp(f"prune-{slug}"), **sample},
                                 lambda prune_dir=prune_dir, name=name: sample_and_score(f"{name} pruned", prune_dir / "model")),
            "after": stages.run(f"sample-{slug}-recovered", {"recovered": stages.stamp(f"recover-{slug}"), **sample},
                                lambda recover_dir=recover_dir, name=name: sample_and_score(f"{name} recovered", recover_dir / "model")),
        }
    return rows

def _mar_report(info: dict, rows: dict, s: MarDemoSettings, seconds: float) -> str:
    enc, dec = info["encoder_depth"], info["decoder_depth"]
    learnable = rows.get("learnable 1:2", {})
    confidence = learnable.get("lowest_confidence")
    guidance = "no guidance" if s.cfg_scale == 1 else f"guidance {s.cfg_scale:g} (linear schedule)"
    lines = [
        "# leandit demo report: TinyMAR",
        "",
        f"The embedded digits MAR teacher (encoder {enc} + decoder {dec} ViT blocks, hidden {info['hidden_size']}, a "
        f"{info['head']} diffusion-loss head, {info['parameters'] / 1e6:.2f} M parameters, {info['tokens']} tokens) "
        f"pruned to half its blocks two ways and recovered with masked KD for {s.recover_steps} steps at batch "
        f"{s.batch_size} (`leandit finetune --mix masked-kd`): learnable 1:2 (TinyFusion's gates and LoRA over encoder "
        f"and decoder as one list, {s.prune_steps} steps of `leandit prune --method learnable --scheme 1:2`"
        + (f", lowest group confidence {confidence:.2f}" if confidence is not None else "")
        + ") and ShortGPT (`leandit prune --method shortgpt --keep 6`: the blocks that turn their input least go).",
        "",
        "| method | blocks kept | encoder + decoder | params | MMACs / image (blocks) | MMACs / image (all) | "
        "digits-FID before recovery | digits-FID after | class agreement before | class agreement after | "
        "sampling s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        after = row["after"]
        i, macs = after["info"], after["macs"]
        before = row.get("before")
        kept = str(row["kept"]) if "kept" in row else f"all {i['encoder_depth'] + i['decoder_depth']}"
        lines.append(
            f"| {name} | {kept} | {i['encoder_depth']} + {i['decoder_depth']} | {i['parameters'] / 1e6:.2f} M | "
            f"{macs['blocks'] / 1e6:.1f} | {macs['total'] / 1e6:.1f} | "
            + (f"{before['digits_fid']:.2f}" if before else "–") + f" | {after['digits_fid']:.2f} | "
            + (f"{before['class_agreement']:.1%}" if before else "–") + f" | {after['class_agreement']:.1%} | "
            f"{after['sampling_seconds']:.1f} |")
    lines += [
        "",
        f"Samples: {rows['teacher']['after']['samples']} class-balanced images per model (seed 0), MAR's unmasking loop "
        f"in {s.num_iter} steps, {guidance}, head temperature {s.temperature:g}, the head's DDPM on the "
        f"{s.head_steps or 'default'} timesteps. digits-FID: the Frechet distance of a small CNN's features (shipped in "
        "`assets/digits-features`) between the samples and the 1797 real digits: comparable among these models only. "
        "Class agreement: the share of samples an SVC trained on the real digits puts in the class asked for. MACs: "
        "of generating one image with these settings, in the encoder and decoder blocks and in all; the head's DDPM "
        "(the same in every model) is most of them at this size, so halving the blocks saves less of the total. "
        "Sampling s: wall time of the samples on this machine.",
        "",
        "Samples, one class per column (first 10 of each class):",
        "",
        "| " + " | ".join(rows) + " |",
        "|" + "---|" * len(rows),
        "| " + " | ".join(f"![{name}]({row['after']['grid']})" for name, row in rows.items()) + " |",
        "",
        f"Demo time (this run; stages reused from earlier runs count as 0): {seconds:.0f} s.",
    ]
    return "\n".join(lines) + "\n"
