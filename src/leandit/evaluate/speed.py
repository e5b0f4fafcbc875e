"""Speed and cost of sampling with a model: parameters, FLOPs, latency per sampling step,
throughput and peak memory, measured side by side so that ratios are fair on a shared,
noisy machine.

A sampling step is what a sampler calls once per step: one forward of the batch, or of twice
the batch with classifier-free guidance (conditional and null-class halves together, as the
original DiT sampler does). Latencies are interleaved: every round times each model once, in
turn, after warm-up; the reported latency is the median over rounds, and a speed-up is the
ratio of medians from the same run.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ..backbones import ClassLabels, backbone, unwrap
from ..diffusion import make_objective
from ..models.flops import count_parameters, forward_flops
from .sampling import model_fn_for


@dataclass
class SpeedResult:
    """One model's row of a speed table."""

    name: str
    depth: int
    parameters: int
    flops_per_step: int
    latency_ms: float
    latency_spread_ms: float  # half the interquartile range over rounds
    images_per_s: float
    peak_memory_mib: float | None
    speedup: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)


def guides(model: nn.Module, cfg_scale: float) -> bool:
    """Whether a sampling step of `model` at this scale runs the guided 2 x batch: class
    models with a null class, and text models (whose empty prompt comes with the prompts)."""
    conditioning = backbone(model).spec.conditioning
    return cfg_scale != 1.0 and (conditioning.has_null or conditioning.kind == "text")


def varies_with_timestep(model: nn.Module) -> bool:
    """Whether a model's cost per step depends on t and its inputs (a DyDiT model): its speed
    is measured over whole sampling trajectories."""
    return bool(getattr(unwrap(model), "varies_with_timestep", False))


def sampling_step(
    model: nn.Module, batch_size: int, cfg_scale: float, device: torch.device, seed: int = 0, trajectory_steps: int | None = None
) -> Callable[[], torch.Tensor]:
    """A no-argument callable that runs one sampling step of `model` on fixed random inputs,
    or, with `trajectory_steps`, a whole sampling run of that many steps (the objective's
    default sampler: DDIM for diffusion, Euler for flow) from fixed noise."""
    spec = backbone(model).spec
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, *spec.input_shape, generator=gen).to(device)
    t = torch.randint(0, 1000, (batch_size,), generator=gen).to(device)
    if spec.objective == "flow":
        t = t.float() / 1000
    conditioning = spec.conditioning
    if isinstance(conditioning, ClassLabels):
        cond = torch.randint(0, conditioning.num_classes, (batch_size,), generator=gen).to(device)
    else:  # text: random embeddings of the example length; the timing does not depend on them
        example = conditioning.example(1)
        cond = {"text": torch.randn(batch_size, *example["text"].shape[1:], generator=gen).to(device),
                "text_mask": example["text_mask"].expand(batch_size, -1).to(device)}
        conditioning = conditioning.with_null({"text": torch.zeros_like(example["text"][0]), "text_mask": example["text_mask"][0]})
    step = model_fn_for(model, cond, cfg_scale if guides(model, cfg_scale) else 1.0, conditioning=conditioning)
    if trajectory_steps is None:
        return lambda: step(x, t)
    objective = make_objective(spec)
    sampler = objective.default_sampler
    return lambda: objective.sample(step, lambda: x, sampler=sampler, steps=trajectory_steps)


def trajectory_macs(model: nn.Module, run: Callable[[], torch.Tensor], steps: int) -> float:
    """Mean MACs per sampling step over one run of `run` (a trajectory of `steps` steps),
    from the model's own count of what its decisions ran."""
    inner = unwrap(model)
    inner.mac_log = []
    try:
        run()
        return sum(inner.mac_log) / steps
    finally:
        inner.mac_log = None


def measure_speed(
    models: Sequence[tuple[str, nn.Module]],
    batch_size: int,
    *,
    cfg_scale: float = 1.5,
    sampling_steps: int = 250,
    warmup: int = 3,
    rounds: int = 10,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    progress: Callable[[str], None] | None = None,
    trajectory_steps: int | None = None,
) -> list[SpeedResult]:
    """Measure every model at the same settings, interleaved; speed-ups are over the first.

    With `trajectory_steps` (needed when a model's cost varies with t, as a DyDiT model's
    does) a round times a whole sampling run of that many steps per model and the latency is
    per step of it; FLOPs are the mean per step over the run, counted from the decisions made.

    Args:
        cfg_scale: guidance scale; != 1 doubles the batch of each forward (for models with a
            null class).
        sampling_steps: steps of a full sampling run, for images per second.
        precision: "fp32" or "bf16" (autocast; on GPUs the usual choice).
    """
    if batch_size < 1 or rounds < 1 or warmup < 0 or sampling_steps < 1:
        raise ValueError("batch size, rounds and sampling steps must be at least 1, warm-up at least 0")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    if trajectory_steps is None and any(varies_with_timestep(m) for _, m in models):
        raise ValueError("a dynamic model's cost depends on the timestep: measure it over sampling trajectories (--trajectory STEPS)")
    if trajectory_steps is not None and trajectory_steps < 1:
        raise ValueError(f"a trajectory needs at least 1 step, got {trajectory_steps}")
    per_call = trajectory_steps or 1
    device = torch.device(device)
    cuda = device.type == "cuda"
    steps = []
    for name, model in models:
        model.eval().requires_grad_(False).to(device)
        steps.append(sampling_step(model, batch_size, cfg_scale, device, trajectory_steps=trajectory_steps))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def timed(step: Callable[[], torch.Tensor]) -> float:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / per_call

    times: list[list[float]] = [[] for _ in models]
    peaks: list[float | None] = [None] * len(models)
    with torch.inference_mode(), autocast:
        for i, step in enumerate(steps):
            for _ in range(warmup):
                step()
            if cuda:  # the step's own peak, above what the weights already hold
                torch.cuda.synchronize(device)
                held = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                step()
                torch.cuda.synchronize(device)
                peaks[i] = (torch.cuda.max_memory_allocated(device) - held) / 2**20
        for r in range(rounds):
            for i, step in enumerate(steps):
                times[i].append(timed(step))
            if progress:
                progress(f"round {r + 1}/{rounds}")

    flops = []
    for (name, model), step in zip(models, steps):
        guided = guides(model, cfg_scale)
        if varies_with_timestep(model):
            with torch.inference_mode(), autocast:
                flops.append(int(2 * trajectory_macs(model, step, trajectory_steps)))
        else:
            flops.append(forward_flops(model, 2 * batch_size if guided else batch_size))
    results = []
    for (name, model), samples, peak, step_flops in zip(models, times, peaks, flops):
        latency = statistics.median(samples)
        quartiles = statistics.quantiles(samples, n=4) if len(samples) > 1 else [latency] * 3
        guided = guides(model, cfg_scale)
        results.append(SpeedResult(
            name=name,
            depth=backbone(model).spec.depth,
            parameters=count_parameters(model),
            flops_per_step=step_flops,
            latency_ms=latency * 1e3,
            latency_spread_ms=(quartiles[2] - quartiles[0]) / 2 * 1e3,
            images_per_s=batch_size / (latency * sampling_steps),
            peak_memory_mib=peak,
        ))
    for result in results:
        result.speedup = results[0].latency_ms / result.latency_ms
    return results


def process_peak_memory_mib(spec: str, batch_size: int, cfg_scale: float, precision: str, load_options: dict | None = None) -> float:
    """CPU peak memory of sampling with one model, measured in a fresh process: the peak
    resident size during one step (the kernel's high-water mark, reset after the model is
    built so that building does not count) minus the resident size of the process before the
    model existed. Weights, activations and allocator slack count; Python and torch do not."""
    arguments = json.dumps([spec, batch_size, cfg_scale, precision, load_options or {}])
    code = f"import json; from leandit.evaluate.speed import _memory_child; print(json.dumps(_memory_child(*json.loads({arguments!r}))))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"measuring the memory of {spec} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1]))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _memory_child(spec: str, batch_size: int, cfg_scale: float, precision: str, load_options: dict) -> float:
    from .model_specs import open_spec

    torch.set_grad_enabled(False)
    base = _status_kib("VmRSS")
    model = open_spec(spec, **load_options).eval()
    step = sampling_step(model, batch_size, cfg_scale, torch.device("cpu"))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        step()  # warm-up: lazily created kernels and buffers
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the current resident size
        step()
    return (_status_kib("VmHWM") - base) / 1024


def compression_variants(model: nn.Module, keep: Sequence[float]) -> list[tuple[str, str, float, nn.Module]]:
    """(kind, name, kept fraction, model) for depth pruning (the first round(L * f) blocks:
    which blocks does not matter for speed) and uniform width pruning (round(H * f) heads and
    round(M * f) MLP channels) at each kept fraction f, plus the full model first."""
    from ..models.blocks import block_list, depth_of, keep_blocks
    from ..models.width import slice_width

    from ..models.dit import DiTBlock

    depth = depth_of(model)
    first = block_list(model)[0]
    if not isinstance(first, DiTBlock):
        raise ValueError(f"the width variants of --curve slice leandit DiT blocks; a {backbone(model).spec.family} "
                         "model gets the depth curve with `leandit bench MODEL MODEL:depth=...` or pruned folders")
    heads, channels = first.attn.num_heads, first.mlp.fc1.out_features
    variants: list[tuple[str, str, float, nn.Module]] = [("full", f"full ({depth} blocks)", 1.0, model)]
    for f in keep:
        if not 0 < f < 1:
            raise ValueError(f"kept fractions must be between 0 and 1, got {f}")
        d = max(1, round(depth * f))
        variants.append(("depth", f"depth {d}/{depth}", f, keep_blocks(model, list(range(d)))))
        h, m = max(1, round(heads * f)), max(1, round(channels * f))
        variants.append(("width", f"width {h}/{heads} heads, {m}/{channels} MLP", f, slice_width(model, h, m)))
    return variants
