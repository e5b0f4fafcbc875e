"""DyDiT's wall-clock speed-up on a DiT-XL/2-sized model (random weights), against the dense
model, side by side in one run and averaged over whole sampling trajectories.

    nice -n 5 python benchmarks/dydit_speed_dit_xl.py                 # this CPU: batch 2 and 16, 1 and 2 threads

A `DynamicModel` gets a fixed, hand-set width/token table of about half the MACs:
- width (TDW): the head and MLP-group routers read a direction of the timestep embedding
  fitted (least squares over t = 0..999) to be t/1000, with a threshold per router output, so
  every block keeps 14 heads / 14 groups for t < 250, 12 for 250 <= t < 500, 10 for
  500 <= t < 750 and 8 for t >= 750 (of 16; the table actually set is read back with
  `width_table()` and printed);
- tokens (SDT): each token router's output layer gets random weights and a bias calibrated,
  block by block in one forward at the trajectory's timesteps, so that 60 % of the tokens
  (of the whole batch) go through that block's MLP; the fraction actually kept varies per
  image, block and step and is what the MACs count.
The backbone's adaLN-Zero output layers get small random weights (N(0, 0.02)) so that the
residual stream changes from block to block (with zero gates every block is the identity and
every token router would see the same tokens); speed does not depend on the weights.

Every model shares the one backbone (the dense model is the backbone itself). A round times
one whole sampling trajectory of every model in turn (the order rotates from round to round),
DDIM with the same t for the whole batch at each step, no guidance (one forward of the batch
per step); latency = median over rounds, speed-up = ratio of medians from the same run,
MACs = the models' own count of what their decisions ran over the timed trajectories
(`last_macs`), ideal = dense MACs / dynamic MACs, fraction of ideal = speed-up / ideal.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
from torch import nn

import leandit
from leandit.backbones import backbone
from leandit.compress.dynamic.model import DynamicModel, DynamicSettings
from leandit.evaluate.speed import sampling_step

HERE = Path(__file__).resolve().parent

# (first timestep of the region, heads kept, groups kept), from high t to low t.
WIDTH_SCHEDULE = [(750, 8, 8), (500, 10, 10), (250, 12, 12), (0, 14, 14)]
TOKEN_KEEP = 0.6


def make_backbone(name: str = "DiT-XL/2", seed: int = 0) -> nn.Module:
    """Random-weight fp32 backbone with small random adaLN output layers (see the docstring)."""
    torch.manual_seed(seed)
    model = leandit.build_model(name).eval().requires_grad_(False)
    with torch.no_grad():
        for block in model.blocks:
            nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.02)
        nn.init.normal_(model.final_layer.adaLN_modulation[-1].weight, std=0.02)
        nn.init.normal_(model.final_layer.linear.weight, std=0.02)
    return model


def fit_time_direction(dynamic: DynamicModel) -> tuple[torch.Tensor, float]:
    """(w, b) with w . t_emb(t) + b = t / 1000 for t = 0..999 (least squares, float64)."""
    t = torch.arange(1000)
    with torch.no_grad():
        emb = backbone(dynamic.backbone).timestep_embedding(t).double()  # (1000, D)
    design = torch.cat([emb, torch.ones(1000, 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, (t.double() / 1000).unsqueeze(1), driver="gelsd").solution.squeeze(1)
    return solution[:-1], float(solution[-1])


def set_width_schedule(dynamic: DynamicModel, schedule=WIDTH_SCHEDULE, scale: float = 2000.0) -> None:
    """Every block's routers keep the schedule's heads / groups at each t: router output k
    (head or group k + 1) is on where s(t) = w . t_emb(t) + b (= t / 1000) is below its
    threshold: always (weights 0, bias +15), never (bias -15) or below a region's start."""
    w, b = fit_time_direction(dynamic)
    H = dynamic.num_heads
    regions = sorted(schedule, key=lambda r: -r[0])  # high t first

    def threshold(k: int, column: int) -> float | None:
        """The t below which output k is on (inf: always; None: never)."""
        kept = k + 2  # output k decides head k + 1: on when that many units are kept
        on = [start for start, *counts in regions if counts[column] >= kept]
        if len(on) == len(regions):
            return float("inf")
        if not on:
            return None
        # on for every region from the highest one where it is on down to t = 0
        highest = max(on)
        above = [start for start, *_ in regions if start > highest]
        return float(min(above))  # the start of the next region up: on below it

    with torch.no_grad():
        for block in dynamic.dynamic_blocks:
            for column, layer in enumerate((block.width_routers.heads, block.width_routers.groups)):
                for k in range(H - 1):
                    edge = threshold(k, column)
                    if edge == float("inf"):
                        layer.weight[k].zero_(), layer.bias[k].fill_(15.0)
                    elif edge is None:
                        layer.weight[k].zero_(), layer.bias[k].fill_(-15.0)
                    else:  # logit = scale * ((edge - 0.5) / 1000 - s(t))
                        layer.weight[k].copy_(-scale * w)
                        layer.bias[k].fill_(scale * ((edge - 0.5) / 1000 - b))


def describe_width_table(dynamic: DynamicModel) -> list[tuple[int, int, int, int]]:
    """[(first t, last t, heads, groups)] runs of the width table (identical in every block,
    checked), from `width_table()` over t = 0..999."""
    table = dynamic.width_table()
    heads = torch.tensor(table["heads"])  # (L, T) bitmasks
    groups = torch.tensor(table["groups"])
    if not (bool((heads == heads[:1]).all()) and bool((groups == groups[:1]).all())):
        raise AssertionError("the width table differs between blocks")
    count = lambda m: sum(((m >> k) & 1) for k in range(dynamic.num_heads))  # noqa: E731
    h, g = count(heads[0]).tolist(), count(groups[0]).tolist()
    runs: list[list[int]] = []
    for t in range(len(h)):
        if runs and runs[-1][2] == h[t] and runs[-1][3] == g[t]:
            runs[-1][1] = t
        else:
            runs.append([t, t, h[t], g[t]])
    return [tuple(r) for r in runs]


def calibrate_token_routers(dynamic: DynamicModel, keep: float, timesteps: list[int], seed: int = 1) -> None:
    """Random output weights for every token router, then its bias set (block by block, in one
    forward where each block sees the decisions of the blocks before it) to the quantile that
    keeps `keep` of the tokens of a batch with one image per timestep."""
    gen = torch.Generator().manual_seed(seed)
    spec = backbone(dynamic.backbone).spec
    n = len(timesteps)
    x = torch.randn(n, *spec.input_shape, generator=gen)
    y = torch.randint(0, spec.conditioning.num_classes, (n,), generator=gen)
    t = torch.tensor(timesteps)
    handles = []

    def calibrate(router, _inputs, logits):
        with torch.no_grad():
            cut = torch.quantile(logits.double().flatten(), 1 - keep).float()
            router.net[2].bias -= cut
            return logits - cut

    with torch.no_grad():
        for block in dynamic.dynamic_blocks:
            last = block.token_router.net[2]
            last.weight.copy_(torch.randn(last.weight.shape, generator=gen) / last.weight.shape[1] ** 0.5)
            last.bias.zero_()
            handles.append(block.token_router.register_forward_hook(calibrate))
        try:
            dynamic.eval()(x, t, y)
        finally:
            for h in handles:
                h.remove()


def trajectory_timesteps(steps: int) -> list[int]:
    """The model timesteps a `steps`-step DDIM run of DiT's diffusion calls the model at."""
    from leandit.diffusion.gaussian import space_timesteps

    return sorted(space_timesteps(1000, steps), reverse=True)


def build_variants(name: str, steps: int, rows: list[str]) -> list[tuple[str, nn.Module]]:
    """[(label, model)]: the dense backbone first, then the dynamic models over the same
    backbone (rows: any of "TDW+SDT", "TDW", "SDT")."""
    dense = make_backbone(name)
    models: list[tuple[str, nn.Module]] = [("dense", dense)]
    timesteps = trajectory_timesteps(steps)
    for label in rows:
        settings = DynamicSettings(width="TDW" in label, tokens="SDT" in label)
        dynamic = DynamicModel(dense, settings).eval()
        if settings.width:
            set_width_schedule(dynamic)
        if settings.tokens:
            calibrate_token_routers(dynamic, TOKEN_KEEP, timesteps)
        dynamic.requires_grad_(False)
        models.append((label, dynamic))
    return models


class Trajectory:
    """One model's DDIM sampling run, advanced one step at a time (what
    `GaussianDiffusion.sample` does, without guidance), so that several models' runs can be
    interleaved step by step."""

    def __init__(self, model: nn.Module, batch: int, steps: int, seed: int = 0, call: nn.Module | None = None):
        from leandit.diffusion import make_objective
        from leandit.evaluate.sampling import model_fn_for

        spec = backbone(model).spec
        gen = torch.Generator().manual_seed(seed)
        self.noise = torch.randn(batch, *spec.input_shape, generator=gen)
        labels = torch.randint(0, spec.conditioning.num_classes, (batch,), generator=gen)
        self.model = model
        # `call`: a compiled module to run instead (what the adapter's predict would call)
        self.step_fn = model_fn_for(model, labels, 1.0) if call is None else (lambda x, t: call(x, t, labels))
        self.process = make_objective(spec).respaced(steps)
        self.steps = steps
        self.reset()

    def reset(self) -> None:
        self.x = self.noise.clone()
        self.i = self.process.num_timesteps - 1

    def step(self) -> None:
        t = torch.full((self.x.shape[0],), self.i, dtype=torch.long)
        out = self.step_fn(self.x, self.process.model_timesteps(t))
        self.x = self.process.ddim_step(out, self.x, t, lambda: torch.randn_like(self.x), 0.0, False)
        self.i -= 1


def timed_rounds(models, batch: int, steps: int, rounds: int, log=print) -> dict[str, dict]:
    """Whole `steps`-step trajectories of every model, interleaved step by step (at each step
    every model runs its forward in turn, the order rotating), `rounds` times.
    {label: {"wall": [s per step, one per round], "cpu": [...], "macs": [MACs per image and
    step, one per round], "kept": [kept-token share, one per round]}}; the dense model's MACs
    are its static count."""
    runs = [Trajectory(m, batch, steps, call=COMPILED.get(label)) for label, m in models]
    out = {label: {"wall": [], "cpu": [], "macs": [], "kept": []} for label, _ in models}
    turn = 0
    with torch.inference_mode():
        for r in range(rounds):
            wall = [0.0] * len(models)
            cpu = [0.0] * len(models)
            macs = [0.0] * len(models)
            kept = [0.0] * len(models)
            for run in runs:
                run.reset()
            for _ in range(steps):
                order = list(range(len(models)))
                order = order[turn % len(order):] + order[: turn % len(order)]
                turn += 1
                for i in order:
                    model = models[i][1]
                    c0, w0 = time.process_time(), time.perf_counter()
                    runs[i].step()
                    wall[i] += time.perf_counter() - w0
                    cpu[i] += time.process_time() - c0
                    if isinstance(model, DynamicModel):
                        macs[i] += float(model.last_macs.mean())
                        if model.settings.tokens:
                            kept[i] += float(torch.stack([b.kept_tokens for b in model.dynamic_blocks]).mean())
                        else:
                            kept[i] += 1.0
                    else:
                        macs[i] += DENSE_MACS[0]
                        kept[i] += 1.0
            for i, (label, _) in enumerate(models):
                out[label]["wall"].append(wall[i] / steps)
                out[label]["cpu"].append(cpu[i] / steps)
                out[label]["macs"].append(macs[i] / steps)
                out[label]["kept"].append(kept[i] / steps)
            log(f"  batch {batch}, {torch.get_num_threads()} thread(s), round {r + 1}/{rounds}: " + ", ".join(
                f"{label} {out[label]['wall'][-1]:.2f} s/step" for label, _ in models), flush=True)
    return out


DENSE_MACS = [0.0]  # MACs per image of one dense forward (set in main)
NUM_HEADS = [0]
COMPILE_NOTES: list[str] = []
COMPILED: dict[str, nn.Module] = {}  # row label -> torch.compile(model), for the compiled rows


def flop_check(models, batch: int = 2, t: int = 666) -> list[str]:
    """The MacCounter's count of one forward against torch's FlopCounterMode (matmuls and
    attention, what leandit.models.flops counts), for every model at one timestep."""
    from torch.utils.flop_counter import FlopCounterMode

    gen = torch.Generator().manual_seed(2)
    lines = []
    for label, model in models:
        spec = backbone(model).spec
        x = torch.randn(batch, *spec.input_shape, generator=gen)
        y = torch.randint(0, 1000, (batch,), generator=gen)
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            model(x, torch.full((batch,), t), y)
        counted = counter.get_total_flops() / 2 / batch
        own = float(model.last_macs.mean()) if isinstance(model, DynamicModel) else DENSE_MACS[0]
        lines.append(f"| {label} | {t} | {own / 1e9:.3f} | {counted / 1e9:.3f} | {100 * (own - counted) / counted:+.3f} % |")
    return lines


def result_table(results: list, kept_tokens: bool = False) -> list[str]:
    """The markdown table of interleaved timings: one group of rows per measurement, every
    speed-up over the dense model of its group (a compiled row over the compiled dense one)."""
    med = statistics.median
    extra = " kept tokens |" if kept_tokens else ""
    lines = ["| threads | batch | model | MACs / image / step (G) | ideal (MAC ratio) | latency / step, wall (s) | speed-up, wall | "
             "of ideal, wall | CPU time / step (s) | speed-up, CPU time | of ideal, CPU time |" + extra,
             "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if kept_tokens else "")]
    groups: dict[tuple[str, int, int], list] = {}
    for phase, threads, batch, label, entry in results:  # one group per measurement (plan item)
        groups.setdefault((phase, threads, batch), []).append((label, entry))
    for (_, threads, batch), entries in groups.items():
        by_label = dict(entries)
        for label, e in entries:
            dense = by_label["dense, compiled"] if label.endswith(", compiled") else by_label["dense"]
            ideal = med(dense["macs"]) / med(e["macs"])
            wall = med(dense["wall"]) / med(e["wall"])
            cpu = med(dense["cpu"]) / med(e["cpu"])
            spread = f" ± {(max(e['wall']) - min(e['wall'])) / 2:.2f}" if len(e["wall"]) > 1 else ""
            lines.append(
                f"| {threads} | {batch} | {label} | {med(e['macs']) / 1e9:.2f} | {ideal:.3f}x | {med(e['wall']):.2f}{spread} | "
                f"**{wall:.3f}x** | **{wall / ideal:.2f}** | {med(e['cpu']):.2f} | {cpu:.3f}x | {cpu / ideal:.2f} |"
                + (f" {100 * med(e['kept']):.1f} % |" if kept_tokens else ""))
    return lines


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{name} ({platform.machine()}), {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DiT-XL/2")
    parser.add_argument("--steps", type=int, default=4, help="DDIM steps of a trajectory (default 4: t = 999, 666, 333, 0)")
    parser.add_argument("--plan", default="1:2:3,1:16:1,2:2:2",
                        help="THREADS:BATCH:ROUNDS measurements, in this order (default 1:2:3,1:16:1,2:2:2)")
    parser.add_argument("--compile-plan", default="", help="THREADS:BATCH:ROUNDS with torch.compile (default none)")
    parser.add_argument("--rows", default="TDW+SDT,TDW,SDT", help="dynamic rows (default TDW+SDT,TDW,SDT)")
    parser.add_argument("--rows-large", default="TDW+SDT", help="rows at batches above 2 (default TDW+SDT)")
    parser.add_argument("--out", type=Path, default=HERE / "dydit_speed_dit_xl_cpu.md")
    args = parser.parse_args()
    started = time.perf_counter()
    rows = [r for r in args.rows.split(",") if r]
    models = build_variants(args.model, args.steps, rows)
    dense_model = models[0][1]
    from leandit.models.flops import forward_flops

    DENSE_MACS[0] = forward_flops(dense_model, 1) / 2
    NUM_HEADS[0] = dense_model.blocks[0].attn.num_heads
    table_runs = describe_width_table(next(m for l, m in models if l == "TDW+SDT")) if "TDW+SDT" in rows else []
    print("width table:", table_runs, flush=True)
    torch.set_num_threads(1)
    with torch.inference_mode():  # warm-up: slice every width pattern, touch every kernel
        for _, m in models:
            run = Trajectory(m, 1, args.steps)
            for _ in range(args.steps):
                run.step()
    flops_lines = flop_check(models)
    print("\n".join(flops_lines), flush=True)
    results = []  # (threads, batch, label, entry)
    large = [r for r in args.rows_large.split(",") if r]
    for k, item in enumerate(filter(None, args.plan.split(","))):
        threads, batch, n_rounds = (int(v) for v in item.split(":"))
        torch.set_num_threads(threads)
        chosen = [models[0]] + [(l, m) for l, m in models[1:] if batch <= 2 or l in large]
        out = timed_rounds(chosen, batch, args.steps, n_rounds)
        for label, _ in chosen:
            results.append((f"eager {k}", threads, batch, label, out[label]))
        write_report(args, results, flops_lines, table_runs, (time.perf_counter() - started) / 60)  # partial, kept if stopped
    if args.compile_plan:
        results += compiled_rounds(args, models, started, results, flops_lines, table_runs)
    minutes = (time.perf_counter() - started) / 60
    write_report(args, results, flops_lines, table_runs, minutes, show=True)


def compiled_rounds(args, models, started, results, flops_lines, table_runs) -> list:
    """torch.compile rows: the dense model (a copy of the backbone with the same weights,
    compiled on its own so that the dynamic models keep calling the eager backbone) and the
    TDW+SDT model, each beside its eager self, interleaved as the eager rows are."""
    import torch._dynamo

    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    dense = models[0][1]
    dynamic = next(m for label, m in models if label == "TDW+SDT")
    copy = make_backbone(args.model)
    copy.load_state_dict(dense.state_dict())
    copy.eval().requires_grad_(False)
    COMPILED["dense, compiled"] = torch.compile(copy)
    COMPILED["TDW+SDT, compiled"] = torch.compile(dynamic)
    chosen = [("dense", dense), ("dense, compiled", copy), ("TDW+SDT", dynamic), ("TDW+SDT, compiled", dynamic)]
    out_rows = []
    for k, item in enumerate(filter(None, args.compile_plan.split(","))):
        threads, batch, n_rounds = (int(v) for v in item.split(":"))
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        timed_rounds(chosen, batch, args.steps, 1, log=lambda *a, **k: None)  # compiles; discarded
        from torch._dynamo.utils import counters

        breaks = sum(counters["graph_break"].values())
        COMPILE_NOTES.append(f"batch {batch}, {threads} thread(s): compiling (one discarded interleaved round) took "
                             f"{time.perf_counter() - t0:.0f} s; dynamo made {counters['stats'].get('unique_graphs', '?')} graphs "
                             f"with {breaks} graph breaks ({'; '.join(r.splitlines()[0][:70] for r in sorted(counters['graph_break'])[:3])})")
        print("  " + COMPILE_NOTES[-1], flush=True)
        out = timed_rounds(chosen, batch, args.steps, n_rounds)
        rows = [(f"compiled {k}", threads, batch, label, out[label]) for label, _ in chosen]
        out_rows += rows
        write_report(args, results + out_rows, flops_lines, table_runs, (time.perf_counter() - started) / 60)
    return out_rows


def write_report(args, results, flops_lines, table_runs, minutes: float, show: bool = False) -> None:
    lines = [
        f"# DyDiT on {args.model}: wall-clock speed-up of a fixed half-MAC width/token table over the dense model",
        "",
        f"Command: `nice -n 5 python benchmarks/dydit_speed_dit_xl.py --steps {args.steps} --plan {args.plan} "
        f"--rows {args.rows} --rows-large {args.rows_large}"
        + (f" --compile-plan {args.compile_plan}" if args.compile_plan else "") + "` "
        f"({time.strftime('%Y-%m-%d')}, {minutes:.0f} min).",
        "",
        f"Machine: {machine()}, shared with other sessions' jobs (the benchmark ran at `nice -n 5`); "
        f"torch {torch.__version__}, fp32, eager; threads as in the table (`torch.set_num_threads`). No GPU was lent "
        "to this session: CPU only.",
        "",
    ]
    lines += ["## Results", "", *result_table(results, kept_tokens=True)]
    lines += ["", "Speed-ups of a compiled row are over the compiled dense model (of an eager row, over the eager one).", ""]
    lines += [f"torch.compile: {note}." for note in COMPILE_NOTES] + ([""] if COMPILE_NOTES else [])
    lines += ["## The table that ran", "",
              f"Width (TDW), the same in every block, read back from `width_table()` over t = 0..999: "
              + "; ".join(f"t {a}-{b}: {h} heads, {g} groups of {NUM_HEADS[0]}" for a, b, h, g in table_runs) + ". "
              f"Tokens (SDT): each block's token router keeps {100 * TOKEN_KEEP:.0f} % of the calibration batch's tokens "
              "(the share kept in the timed runs is in the table).",
              "",
              "## MAC count cross-check (one forward, batch 2)", "",
              "| model | t | MACs / image, MacCounter (G) | MACs / image, FlopCounterMode / 2 (G) | difference |",
              "|---|---|---|---|---|", *flops_lines, ""]
    text = "\n".join(lines) + "\n"
    import json

    args.out.with_suffix(".json").write_text(json.dumps([list(r) for r in results], indent=1))  # the raw timings
    if show:
        print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
