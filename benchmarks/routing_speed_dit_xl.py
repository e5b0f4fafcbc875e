"""Token routing's (DiffCR's) wall-clock speed-up on a DiT-XL/2-sized model (random weights),
against the dense model, side by side in one run and averaged over whole sampling trajectories.

    nice -n 5 python benchmarks/routing_speed_dit_xl.py                          # this CPU: batch 2 and 16
    python benchmarks/routing_speed_dit_xl.py --device cuda --precision bf16 --plan 1:128:5 --name gpu

Two `RoutedModel`s over the one backbone (the dense model is the backbone itself), each with a
static schedule set with `set_schedule` (what `freeze()` or a loaded "diffcr" folder gives: one
run of every block per forward at its k, static shapes):
- "uniform k=128": every block keeps 128 of the 256 tokens in every timestep region;
- "learned-like": a different k per block and region, as training learns them (the default
  10 ratio bins, so k is one of 26, 52, 77, .., 256): a smooth profile over depth (the first
  and last blocks keep more than the middle ones) and fewer tokens at noisier timesteps,
  shifted as a whole so that the MAC ratio averaged over the 4 regions is about one half. The
  schedule actually set is printed in the report.
Routers keep their random initialisation (which tokens are kept does not change the cost); the
backbone's adaLN-Zero output layers get small random weights (N(0, 0.02)) so the residual
stream changes from block to block (as `dydit_speed_dit_xl.py` does).

What is timed: the plain sampling forward (no guidance: one forward of the batch per step, the
batch being the table's), DDIM with the same t for the whole batch, 4 steps (t = 999, 666, 333,
0: one step in each of the 4 timestep regions). The models' trajectories are interleaved step
by step (at each step every model runs its forward in turn, the order rotating); latency =
median over rounds of the mean per step of a whole trajectory; speed-up = ratio of medians in
the same measurement; MACs = the routed model's own count of what ran (`last_macs`, from
`RoutedModel.macs`), ideal = dense MACs / routed MACs, fraction of ideal = speed-up / ideal.
CPU time (`time.process_time`) is given beside wall time: on a shared machine the wall clock
also measures the other jobs, and with 1 thread CPU time is the robust number.

`--compile-plan` adds torch.compile rows (the dense model: a compiled copy of the backbone; the
uniform routed model: `torch.compile(routed)` over that copy), each beside its eager self.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from torch import nn

import leandit
from leandit.backbones import backbone
from leandit.compress.routing import RoutedModel, RoutingSettings
from leandit.compress.routing.ratios import capacity, nearest_bin

HERE = Path(__file__).resolve().parent
REGIONS, BINS = 4, 10

import sys  # noqa: E402

sys.path.insert(0, str(HERE))
from dydit_speed_dit_xl import machine, make_backbone, result_table  # noqa: E402  the same model and machine line as DyDiT's table


def learned_like_schedule(routed: RoutedModel, target: float = 0.5) -> torch.Tensor:
    """Capacities (L, R) on the ratio bins: r[l, g] = base + 0.3 cos(2 pi l / (L - 1)) +
    0.15 (1.5 - g) / 1.5 (more tokens at the first and last blocks and at the least noisy
    region 0), each at its nearest bin, with base bisected so that the mean MAC ratio over
    regions is the one closest to `target`."""
    L, R, T = routed.depth, routed.settings.regions, routed.num_tokens
    layer = 0.3 * torch.cos(2 * math.pi * torch.arange(L, dtype=torch.float64) / max(L - 1, 1))
    region = 0.15 * (1.5 - torch.arange(R, dtype=torch.float64)) / 1.5 if R > 1 else torch.zeros(1, dtype=torch.float64)

    def at(base: float) -> torch.Tensor:
        r = (base + layer[:, None] + region[None, :]).clamp(1 / BINS, 1.0)
        return torch.tensor([[capacity(nearest_bin(v, BINS), BINS, T) for v in row] for row in r.tolist()])

    lo, hi = -1.0, 2.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if float(routed.mac_ratio_per_region(at(mid)).mean()) < target:
            lo = mid
        else:
            hi = mid
    candidates = [at(lo), at(hi)]
    return min(candidates, key=lambda k: abs(float(routed.mac_ratio_per_region(k).mean()) - target))


def build_variants(name: str) -> list[tuple[str, nn.Module]]:
    """[(label, model)]: the dense backbone, then the two routed models over it."""
    dense = make_backbone(name)
    models: list[tuple[str, nn.Module]] = [("dense", dense)]
    settings = RoutingSettings(regions=REGIONS, bins=BINS)
    uniform = RoutedModel(dense, settings).eval().requires_grad_(False)
    T = uniform.num_tokens
    uniform.set_schedule(torch.full((uniform.depth, REGIONS), T // 2, dtype=torch.long))
    models.append((f"uniform k={T // 2}", uniform))
    learned = RoutedModel(dense, settings).eval().requires_grad_(False)
    learned.set_schedule(learned_like_schedule(learned))
    models.append(("learned-like", learned))
    return models


class Trajectory:
    """One model's DDIM run without guidance, advanced one step at a time (what
    `GaussianDiffusion.sample` does), so that several models' runs interleave step by step."""

    def __init__(self, model: nn.Module, batch: int, steps: int, device: torch.device, seed: int = 0, call=None):
        from leandit.diffusion import make_objective
        from leandit.evaluate.sampling import model_fn_for

        spec = backbone(model).spec
        gen = torch.Generator().manual_seed(seed)
        self.noise = torch.randn(batch, *spec.input_shape, generator=gen).to(device)
        labels = torch.randint(0, spec.conditioning.num_classes, (batch,), generator=gen).to(device)
        # `call`: a compiled module to run instead (what the adapter's predict would call)
        self.step_fn = model_fn_for(model, labels, 1.0) if call is None else (lambda x, t: call(x, t, labels))
        self.process = make_objective(spec).respaced(steps)
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.x = self.noise.clone()
        self.i = self.process.num_timesteps - 1

    def step(self) -> None:
        t = torch.full((self.x.shape[0],), self.i, dtype=torch.long, device=self.device)
        out = self.step_fn(self.x, self.process.model_timesteps(t))
        self.x = self.process.ddim_step(out, self.x, t, lambda: torch.randn_like(self.x), 0.0, False)
        self.i -= 1


def timed_rounds(models, batch: int, steps: int, rounds: int, device: torch.device, precision: str,
                 compiled: dict | None = None, log=print) -> dict[str, dict]:
    """{label: {"wall": [s per step, one per round], "cpu": [...], "macs": [MACs per image and
    step, one per round]}} of whole trajectories interleaved step by step, `rounds` times."""
    compiled = compiled or {}
    runs = [Trajectory(m, batch, steps, device, call=compiled.get(label)) for label, m in models]
    out = {label: {"wall": [], "cpu": [], "macs": []} for label, _ in models}
    cuda = device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    turn = 0
    with torch.inference_mode(), autocast:
        for r in range(rounds):
            wall, cpu, macs = ([0.0] * len(models) for _ in range(3))
            for run in runs:
                run.reset()
            for _ in range(steps):
                order = list(range(len(models)))
                order = order[turn % len(order):] + order[: turn % len(order)]
                turn += 1
                for i in order:
                    model = models[i][1]
                    if cuda:
                        torch.cuda.synchronize(device)
                    c0, w0 = time.process_time(), time.perf_counter()
                    runs[i].step()
                    if cuda:
                        torch.cuda.synchronize(device)
                    wall[i] += time.perf_counter() - w0
                    cpu[i] += time.process_time() - c0
                    macs[i] += float(model.last_macs.mean()) if isinstance(model, RoutedModel) else DENSE_MACS[0]
            for i, (label, _) in enumerate(models):
                out[label]["wall"].append(wall[i] / steps)
                out[label]["cpu"].append(cpu[i] / steps)
                out[label]["macs"].append(macs[i] / steps)
            log(f"  batch {batch}, {torch.get_num_threads()} thread(s), round {r + 1}/{rounds}: " + ", ".join(
                f"{label} {out[label]['wall'][-1]:.2f} s/step ({out[label]['cpu'][-1]:.2f} CPU)" for label, _ in models),
                flush=True)
    return out


DENSE_MACS = [0.0]  # MACs per image of one dense forward (set in main)
COMPILE_NOTES: list[str] = []


def load() -> str:
    try:
        return "load average " + " / ".join(f"{v:.1f}" for v in os.getloadavg()) + " (1 / 5 / 15 min)"
    except OSError:
        return "load average unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DiT-XL/2")
    parser.add_argument("--steps", type=int, default=4, help="DDIM steps of a trajectory (default 4: one per region)")
    parser.add_argument("--plan", default="1:2:3,1:16:1", help="THREADS:BATCH:ROUNDS measurements, in this order")
    parser.add_argument("--compile-plan", default="", help="THREADS:BATCH:ROUNDS with torch.compile (default none)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--name", default="cpu", help="suffix of the report, routing_speed_dit_xl_<name>.md")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.out = args.out or HERE / f"routing_speed_dit_xl_{args.name}.md"
    device = torch.device(args.device)
    started = time.perf_counter()
    models = build_variants(args.model)
    for _, m in models:
        m.to(device)
    from leandit.models.flops import forward_flops

    DENSE_MACS[0] = forward_flops(models[0][1], 1) / 2
    schedule = models[2][1].schedule
    torch.set_num_threads(1)
    with torch.inference_mode():  # warm-up: every kernel at every capacity
        timed_rounds(models, 1, args.steps, 1, device, args.precision, log=lambda *a, **k: None)
    loads = [f"start: {load()}"]
    results = []  # (phase, threads, batch, label, entry)
    for k, item in enumerate(filter(None, args.plan.split(","))):
        threads, batch, n_rounds = (int(v) for v in item.split(":"))
        torch.set_num_threads(threads)
        out = timed_rounds(models, batch, args.steps, n_rounds, device, args.precision)
        results += [(f"eager {k}", threads, batch, label, out[label]) for label, _ in models]
        loads.append(f"after {item}: {load()}")
        write_report(args, results, schedule, models, loads, (time.perf_counter() - started) / 60)
    if args.compile_plan:
        results += compiled_rounds(args, models, device, results, schedule, loads, started)
    write_report(args, results, schedule, models, loads, (time.perf_counter() - started) / 60, show=True)


def compiled_rounds(args, models, device, results, schedule, loads, started) -> list:
    """torch.compile rows: the dense model (a compiled copy of the backbone with the same
    weights) and the uniform routed model (a RoutedModel over that copy, compiled as a whole),
    beside their eager selves, interleaved."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    dense, (uniform_label, uniform) = models[0][1], models[1]
    copy = make_backbone(args.model).to(device)
    copy.load_state_dict(dense.state_dict())
    copy.eval().requires_grad_(False)
    routed_copy = RoutedModel(copy, uniform.settings).eval().requires_grad_(False).to(device)
    routed_copy.load_state_dict(uniform.state_dict())  # the routers (and the same backbone weights)
    routed_copy.set_schedule(uniform.schedule)
    compiled = {"dense, compiled": torch.compile(copy), f"{uniform_label}, compiled": torch.compile(routed_copy)}
    chosen = [("dense", dense), ("dense, compiled", copy), (uniform_label, uniform), (f"{uniform_label}, compiled", routed_copy)]
    rows = []
    for k, item in enumerate(filter(None, args.compile_plan.split(","))):
        threads, batch, n_rounds = (int(v) for v in item.split(":"))
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        timed_rounds(chosen, batch, args.steps, 1, device, args.precision, compiled, log=lambda *a, **k: None)  # compiles
        breaks = sum(counters["graph_break"].values())
        reasons = "; ".join(r.splitlines()[0][:80] for r in sorted(counters["graph_break"]))
        COMPILE_NOTES.append(
            f"batch {batch}, {threads} thread(s): compiling (one discarded interleaved round) took {time.perf_counter() - t0:.0f} s; "
            f"dynamo made {counters['stats'].get('unique_graphs', '?')} graphs with {breaks} graph breaks ({reasons})")
        print("  " + COMPILE_NOTES[-1], flush=True)
        with torch.inference_mode():
            x = torch.randn(batch, *backbone(dense).spec.input_shape, device=device)
            t, y = torch.full((batch,), 666, device=device), torch.zeros(batch, dtype=torch.long, device=device)
            difference = float((compiled[f"{uniform_label}, compiled"](x, t, y) - uniform(x, t, y)).abs().max())
        COMPILE_NOTES.append(f"compiled routed output vs eager at t = 666: max abs difference {difference:.2e}")
        out = timed_rounds(chosen, batch, args.steps, n_rounds, device, args.precision, compiled)
        rows += [(f"compiled {k}", threads, batch, label, out[label]) for label, _ in chosen]
        loads.append(f"after compiled {item}: {load()}")
        write_report(args, results + rows, schedule, models, loads, (time.perf_counter() - started) / 60)
    return rows


def write_report(args, results, schedule, models, loads, minutes: float, show: bool = False) -> None:
    learned = models[2][1]
    per_region = learned.mac_ratio_per_region(schedule).tolist()
    command = (f"nice -n 5 python benchmarks/routing_speed_dit_xl.py --steps {args.steps} --plan {args.plan}"
               + (f" --compile-plan {args.compile_plan}" if args.compile_plan else "")
               + (f" --device {args.device} --precision {args.precision}" if args.device != "cpu" else ""))
    device = (torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "CPU only")
    lines = [
        f"# Token routing (DiffCR) on {args.model}: wall-clock speed-up of static half-MAC schedules over the dense model",
        "",
        f"Command: `{command}` ({time.strftime('%Y-%m-%d')}, {minutes:.0f} min).",
        "",
        f"Machine: {machine()}, {device}; torch {torch.__version__}, {args.precision}, threads as in the table "
        f"(`torch.set_num_threads`). Load: " + "; ".join(loads) + ".",
        "",
        "## Results", "",
        *result_table(results),
    ]
    lines += ["", "Speed-ups of a compiled row are over the compiled dense model (of an eager row, over the eager one).", ""]
    lines += [f"torch.compile: {note}." for note in COMPILE_NOTES] + ([""] if COMPILE_NOTES else [])
    rows = schedule.tolist()
    lines += ["## The learned-like schedule that ran", "",
              f"Kept tokens k (of {learned.num_tokens}) per block and timestep region (region 0: t 0-249, the least noisy; "
              "region 3: t 750-999); MAC ratio per region " + ", ".join(f"{v:.3f}" for v in per_region)
              + f" (mean {sum(per_region) / len(per_region):.3f}).", "",
              "| block | " + " | ".join(f"region {g}" for g in range(len(rows[0]))) + " |",
              "|---|" + "---|" * len(rows[0]),
              *(f"| {i} | " + " | ".join(str(v) for v in row) + " |" for i, row in enumerate(rows)), ""]
    text = "\n".join(lines) + "\n"
    args.out.with_suffix(".json").write_text(json.dumps([list(r) for r in results], indent=1))
    if show:
        print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
