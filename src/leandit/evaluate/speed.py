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
from ..compress.step_cache import reset_step_caches
from ..devices import compile_for_sampling
from ..diffusion import PerSampleNoise, make_objective
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
    model: nn.Module, batch_size: int, cfg_scale: float, device: torch.device, seed: int = 0, trajectory_steps: int | None = None,
    sampler: str | None = None,
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
    sampler = sampler or objective.default_sampler
    if sampler not in objective.samplers:
        raise ValueError(f"sampler {sampler!r} does not fit a {spec.objective} model; choose one of {objective.samplers}")

    def run() -> torch.Tensor:
        reset_step_caches(model)  # every run is a trajectory from its first step
        return objective.sample(step, lambda: x, sampler=sampler, steps=trajectory_steps)

    return run


def seconds_of(call: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of one call, the GPU's queue included (synchronised before and after)."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    call()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


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
    compile: bool = False,
    cuda_graphs: bool = False,
    sampler: str | None = None,
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
        sampler: with `trajectory_steps`, the sampler of the runs (default: the objective's).
        compile, cuda_graphs: time the models compiled by torch.compile (in place; the
            warm-up steps absorb the compilation), with CUDA graphs on a GPU; FLOPs are
            counted on the eager models first.
    """
    if batch_size < 1 or rounds < 1 or warmup < 0 or sampling_steps < 1:
        raise ValueError("batch size, rounds and sampling steps must be at least 1, warm-up at least 0")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    if trajectory_steps is None and any(varies_with_timestep(m) for _, m in models):
        raise ValueError("a dynamic model's cost depends on the timestep: measure it over sampling trajectories (--trajectory STEPS)")
    if trajectory_steps is not None and trajectory_steps < 1:
        raise ValueError(f"a trajectory needs at least 1 step, got {trajectory_steps}")
    if sampler is not None and trajectory_steps is None:
        raise ValueError("a sampler applies to whole trajectories: give trajectory_steps (--trajectory STEPS)")
    mar = [name for name, model in models if is_masked(model)]
    if mar:
        raise ValueError(f"{', '.join(mar)}: a MAR model has no single sampling step; time its whole generation loop "
                         "(measure_generation_speed)")
    per_call = trajectory_steps or 1
    device = torch.device(device)
    cuda = device.type == "cuda"
    steps = []
    for name, model in models:
        model.eval().requires_grad_(False).to(device)
        steps.append(sampling_step(model, batch_size, cfg_scale, device, trajectory_steps=trajectory_steps, sampler=sampler))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    flops = []
    for (name, model), step in zip(models, steps):
        guided = guides(model, cfg_scale)
        if varies_with_timestep(model):
            with torch.inference_mode(), autocast:
                flops.append(int(2 * trajectory_macs(model, step, trajectory_steps)))
        else:
            flops.append(forward_flops(model, 2 * batch_size if guided else batch_size))
    if compile or cuda_graphs:
        warmup = max(warmup, 2)  # the first calls compile (and record the graph)
        for _, model in models:
            compile_for_sampling(model, device, cuda_graphs)

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
                times[i].append(seconds_of(step, device) / per_call)
            if progress:
                progress(f"round {r + 1}/{rounds}")

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


def process_peak_memory_mib(spec: str, batch_size: int, cfg_scale: float, precision: str, load_options: dict | None = None,
                            loop_options: dict | None = None) -> float:
    """CPU peak memory of sampling with one model, measured in a fresh process: the peak
    resident size during one step (the kernel's high-water mark, reset after the model is
    built so that building does not count) minus the resident size of the process before the
    model existed. Weights, activations and allocator slack count; Python and torch do not.
    A MAR model's "step" is its whole generation loop (`loop_options`: num_iter, head_steps)."""
    arguments = json.dumps([spec, batch_size, cfg_scale, precision, load_options or {}, loop_options or {}])
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


def _memory_child(spec: str, batch_size: int, cfg_scale: float, precision: str, load_options: dict,
                  loop_options: dict | None = None) -> float:
    from .model_specs import open_spec

    torch.set_grad_enabled(False)
    base = _status_kib("VmRSS")
    model = open_spec(spec, **load_options).eval()
    if is_masked(model):
        options = {"num_iter": min(64, backbone(model).model.config.num_tokens), **(loop_options or {})}
        step = generation_loop(model, batch_size, cfg_scale, torch.device("cpu"), **options)
    else:
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


# -- MAR: the whole generation loop, and where its time goes ---------------------------------
# MAR has no single sampling step to time: each of its iterations runs the encoder and decoder
# once and the head's DDPM (100 steps) on the tokens it predicts. A row times whole loops per
# image and splits the time into the transformer blocks (encoder + decoder), the head, and the
# rest (embeddings, masks, the DDPM arithmetic and noise), timed inside the same loops.


def is_masked(model: nn.Module) -> bool:
    """Whether `model` generates by MAR's loop (objective "masked")."""
    return backbone(model).spec.objective == "masked"


class _Clock:
    """Intervals on the host clock (CPU), or CUDA events read once at the end (no sync per
    interval, so timing does not change what it times)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.totals: dict[str, float] = {}
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, started, bucket: str) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((bucket, started, end))
        else:
            self.totals[bucket] = self.totals.get(bucket, 0.0) + time.perf_counter() - started

    def read(self) -> dict[str, float]:
        if self.cuda and self._events:
            torch.cuda.synchronize()
            for bucket, start, end in self._events:
                self.totals[bucket] = self.totals.get(bucket, 0.0) + start.elapsed_time(end) / 1e3
            self._events.clear()
        return dict(self.totals)

    def reset(self) -> None:
        self.totals.clear()
        self._events.clear()


class LoopProfile:
    """While installed, times the parts of every MAR generation loop `model` runs: "blocks"
    (from the first block of each list to its last), "context" (whole `model.context` calls:
    the blocks plus embeddings and masks) and "head" (`model.head` calls).

    With `run_steps` (a set of loop steps, as in `leandit.models.flops.generation_schedule`)
    only those steps call the network; the others get zeros of the right shape at almost no
    cost (for estimating a loop too slow to run whole: see `measure_generation_speed`)."""

    def __init__(self, model: nn.Module, device: torch.device | str, run_steps: set[int] | None = None,
                 schedule: list[dict[str, int]] | None = None):
        self.model = backbone(model).model
        self.clock = _Clock(torch.device(device))
        self.run_steps = run_steps
        self.schedule = schedule or []
        self._calls = 0
        self._skipping = False
        self._handles: list = []

    def __enter__(self) -> "LoopProfile":
        model, clock = self.model, self.clock
        for name in ("encoder_blocks", "decoder_blocks"):
            blocks = getattr(model, name)
            if len(blocks) == 0:
                continue
            opened: list = []
            self._handles.append(blocks[0].register_forward_pre_hook(lambda m, a, opened=opened: opened.append(clock.start())))
            self._handles.append(blocks[-1].register_forward_hook(
                lambda m, a, o, opened=opened: clock.stop(opened.pop(), "blocks")))
        context, head = model.context, model.head
        config = model.config

        def timed_context(tokens, mask, labels):
            step = self.schedule[self._calls]["step"] if self.run_steps is not None else None
            self._calls += 1
            self._skipping = self.run_steps is not None and step not in self.run_steps
            if self._skipping:
                return tokens.new_zeros(tokens.shape[0], config.num_tokens, config.decoder_hidden_size)
            started = clock.start()
            z = context(tokens, mask, labels)
            clock.stop(started, "context")
            return z

        def timed_head(x, t, z):
            if self._skipping:
                return x.new_zeros(x.shape[0], 2 * x.shape[1])
            started = clock.start()
            out = head(x, t, z)
            clock.stop(started, "head")
            return out

        model.context, model.head = timed_context, timed_head  # instance attributes shadow the methods
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for name in ("context", "head"):
            self.model.__dict__.pop(name, None)

    def reset(self) -> None:
        self.clock.reset()
        self._calls = 0
        self._skipping = False

    def read(self) -> dict[str, float]:
        totals = self.clock.read()
        return {part: totals.get(part, 0.0) for part in ("blocks", "context", "head")}


@dataclass
class LoopSpeedResult:
    """One MAR model's row: the whole generation loop per image and its parts."""

    name: str
    encoder_depth: int
    decoder_depth: int
    parameters: int
    flops_per_image: int
    block_flops_per_image: int
    head_flops_per_image: int
    seconds_per_image: float  # median over rounds
    spread_s: float  # half the interquartile range over rounds
    blocks_s: float  # per image, from the round with the median total
    head_s: float
    rest_s: float  # total - blocks - head: embeddings, masks, the head's DDPM arithmetic and noise
    images_per_s: float
    peak_memory_mib: float | None
    num_iter: int
    head_steps: int | str
    guided: bool
    step_stride: int = 1  # 1: every step ran; k: every k-th step ran and stands for k (an estimate)
    macs_coverage: float = 1.0  # MACs of the steps run x stride / MACs of the whole loop
    speedup: float = 1.0
    block_speedup: float = 1.0

    @property
    def depth(self) -> int:
        return self.encoder_depth + self.decoder_depth

    def to_dict(self) -> dict:
        return {**asdict(self), "depth": self.depth}


def generation_loop(model: nn.Module, batch_size: int, cfg_scale: float, device: torch.device | str, *,
                    num_iter: int, head_steps: int | str | None = None, seed: int = 0) -> Callable[[], torch.Tensor]:
    """A no-argument callable running MAR's whole generation loop for `batch_size` fixed
    labels and the per-image noise of `seed` (the same images at every call)."""
    adapter = backbone(model)
    spec = adapter.spec
    labels = torch.randint(0, spec.conditioning.num_classes, (batch_size,), generator=torch.Generator().manual_seed(seed)).to(device)
    guided = guides(model, cfg_scale)

    def run() -> torch.Tensor:
        noise = PerSampleNoise(seed, range(batch_size), device)
        return adapter.generate(labels, noise, num_iter=num_iter, cfg_scale=cfg_scale if guided else 1.0,
                                head_steps=head_steps)

    return run


def measure_generation_speed(
    models: Sequence[tuple[str, nn.Module]],
    batch_size: int,
    *,
    cfg_scale: float = 1.0,
    num_iter: int | None = None,
    head_steps: int | str | None = None,
    warmup: int = 1,
    rounds: int = 3,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    step_stride: int = 1,
    progress: Callable[[str], None] | None = None,
) -> list[LoopSpeedResult]:
    """Time MAR's whole generation loop (encoder, decoder and head over every iteration,
    guidance included when cfg_scale != 1) for every model, interleaved; speed-ups (whole
    loop and block part) are over the first model.

    A round runs one loop per model in turn; the parts are timed inside that same loop
    (`LoopProfile`), so blocks + head + rest is the measured total. `step_stride` k > 1 runs
    the network only at steps k//2, k//2 + k, ... (each standing for its k steps) and adds the
    rest of the loop as it ran: an estimate for loops too slow to time whole (the
    `macs_coverage` of a row says how well those steps stand for the loop's MACs).
    """
    from ..models.flops import generation_schedule, mar_step_macs

    if batch_size < 1 or rounds < 1 or warmup < 0 or step_stride < 1:
        raise ValueError("batch size, rounds and the step stride must be at least 1, warm-up at least 0")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    not_mar = [name for name, model in models if not is_masked(model)]
    if not_mar:
        raise ValueError(f"{', '.join(not_mar)}: not a MAR model; DiT/SiT models are timed per sampling step (measure_speed)")
    device = torch.device(device)
    configs = [backbone(model).model.config for _, model in models]
    tokens = {c.num_tokens for c in configs}
    num_iter = num_iter or min(64, min(tokens))
    for (name, _), c in zip(models, configs):
        if not 1 <= num_iter <= c.num_tokens:
            raise ValueError(f"{name}: MAR generation needs 1 to {c.num_tokens} iterations, got {num_iter}")
        if head_steps is not None:
            from ..diffusion.masked import head_spacing

            head_spacing(head_steps, c.head_timesteps)  # a one-line error for a bad spacing
    if step_stride > 1 and num_iter % step_stride:
        raise ValueError(f"the step stride {step_stride} must divide the {num_iter} iterations")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    loops, profiles, schedules = [], [], []
    for (name, model), c in zip(models, configs):
        model.eval().requires_grad_(False).to(device)
        loops.append(generation_loop(model, batch_size, cfg_scale, device, num_iter=num_iter, head_steps=head_steps))
        schedule = generation_schedule(num_iter, c.num_tokens)
        run_steps = None if step_stride == 1 else {s["step"] for s in schedule if s["step"] % step_stride == step_stride // 2}
        schedules.append((schedule, run_steps))
        profiles.append(LoopProfile(model, device, run_steps, schedule))
    rows: list[list[dict[str, float]]] = [[] for _ in models]
    with torch.inference_mode(), autocast:
        for loop, profile in zip(loops, profiles):
            with profile:
                for _ in range(warmup):
                    profile.reset()
                    loop()
        for r in range(rounds):
            for i, (loop, profile) in enumerate(zip(loops, profiles)):
                with profile:
                    profile.reset()
                    measured = seconds_of(loop, device)
                    parts = profile.read()
                k = step_stride
                total = measured + (k - 1) * (parts["context"] + parts["head"])  # the skipped steps' network calls
                blocks, head = k * parts["blocks"], k * parts["head"]
                rows[i].append({"total": total, "blocks": blocks, "head": head, "rest": total - blocks - head})
            if progress:
                progress(f"round {r + 1}/{rounds}")
    results = []
    for (name, model), c, samples, (schedule, run_steps) in zip(models, configs, rows, schedules):
        guided = guides(model, cfg_scale)
        totals = [s["total"] for s in samples]
        median = statistics.median(totals)
        quartiles = statistics.quantiles(totals, n=4) if len(totals) > 1 else [median] * 3
        middle = samples[sorted(range(len(totals)), key=totals.__getitem__)[(len(totals) - 1) // 2]]
        per_step = mar_step_macs(model, batch_size, num_iter=num_iter, head_steps=head_steps, guided=guided)
        macs = {part: sum(s[part] for s in per_step) for part in ("blocks", "head", "other")}
        macs["total"] = sum(macs.values())
        coverage = 1.0
        if run_steps is not None:
            covered = step_stride * sum(s["blocks"] + s["head"] + s["other"] for s in per_step if s["step"] in run_steps)
            coverage = covered / macs["total"]
        results.append(LoopSpeedResult(
            name=name, encoder_depth=c.encoder_depth, decoder_depth=c.decoder_depth, parameters=count_parameters(model),
            flops_per_image=2 * macs["total"] // batch_size, block_flops_per_image=2 * macs["blocks"] // batch_size,
            head_flops_per_image=2 * macs["head"] // batch_size,
            seconds_per_image=median / batch_size, spread_s=(quartiles[2] - quartiles[0]) / 2 / batch_size,
            blocks_s=middle["blocks"] / batch_size * median / middle["total"],
            head_s=middle["head"] / batch_size * median / middle["total"],
            rest_s=middle["rest"] / batch_size * median / middle["total"],
            images_per_s=batch_size / median, peak_memory_mib=None, num_iter=num_iter,
            head_steps=head_steps or c.head_sampling_steps, guided=guided, step_stride=step_stride, macs_coverage=coverage,
        ))
    first = results[0]
    for result in results:
        result.speedup = first.seconds_per_image / result.seconds_per_image
        result.block_speedup = first.blocks_s / result.blocks_s if result.blocks_s > 0 else float("inf")
    return results
