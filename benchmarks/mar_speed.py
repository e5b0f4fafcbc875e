"""MAR-L's whole generation loop against MAR-L pruned to 16 blocks, on this machine: where the
time goes (transformer blocks, diffusion head, the rest) and what depth pruning buys.

    OMP_NUM_THREADS=2 nice python benchmarks/mar_speed.py              # this CPU, ~10 minutes

Models: `leandit.build_model("MAR-L")` (encoder 16 + decoder 16 blocks of width 1024, head of
8 residual blocks of width 1280, 479 M parameters) with random weights (the head's zero-init
modulation and output layers get N(0, 0.02), so the loop is not fed zeros; speed does not
depend on the weights), and copies of it keeping 16 of its 32 blocks (`keep_blocks`: the
first ones of each list) for each --splits entry ENC+DEC, e.g. 8+8 (half of each list) and
16+0 (the encoder only: encoder blocks see the buffer and the known tokens, 64 to 319, the
decoder's always all 320, so keeping encoder blocks is the cheaper half).

A row is MAR's generation loop (`MaskedDiffusion.generate`, via `leandit.evaluate.speed.
measure_generation_speed`): 64 iterations, the head's 100-step DDPM on every token each
iteration predicts, batch 2, guidance as given (the context and head then run on 2 x batch).
The parts are timed inside the loop (`LoopProfile`): blocks = from the first block of each
list to its last, head = the head's calls, rest = total - blocks - head.

A whole MAR-L loop takes about 35 minutes on a 2-core CPU, so by default the network runs only
at every --stride-th iteration (the middle one of each group of that many), each standing for
its group; the other iterations run the loop's own code with the network's outputs replaced by
zeros, and their cost (the DDPM arithmetic, noise, masks) is measured as it ran. The MACs of the
iterations run x stride against the loop's MACs (column "MACs covered") say how well they stand
for the loop. `--stride 1` times whole loops.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent


def make_model(spec: str, seed: int = 0) -> nn.Module:
    """A named size with random weights and the head's zero-init layers drawn from N(0, 0.02)."""
    from leandit.evaluate.model_specs import open_spec

    torch.manual_seed(seed)
    model = open_spec(spec).eval().requires_grad_(False)
    net = model.diffloss.net
    with torch.no_grad():
        for layer in [b.adaLN_modulation[-1] for b in net.res_blocks] + [net.final_layer.adaLN_modulation[-1],
                                                                         net.final_layer.linear]:
            nn.init.normal_(layer.weight, std=0.02)
    return model


def pruned(model: nn.Module, split: str) -> tuple[str, nn.Module]:
    """("ENC+DEC", a copy keeping the first ENC encoder and first DEC decoder blocks)."""
    from leandit.models.blocks import keep_blocks

    try:
        enc, dec = (int(v) for v in split.split("+"))
    except ValueError:
        raise SystemExit(f"--splits takes ENC+DEC entries such as 8+8, got {split!r}") from None
    c = model.config
    if not (0 <= enc <= c.encoder_depth and 0 <= dec <= c.decoder_depth and enc + dec >= 1):
        raise SystemExit(f"split {split}: the model has {c.encoder_depth} encoder and {c.decoder_depth} decoder blocks")
    kept = list(range(enc)) + [c.encoder_depth + i for i in range(dec)]
    return f"{split} (pruned)", keep_blocks(model, kept)


def warm_up(models, batch_size: int, cfg: float) -> None:
    """One context call and a few head calls per model: first-call allocations out of the timing."""
    for _, m in models:
        c = m.config
        n = batch_size * (2 if cfg != 1.0 else 1)
        tokens = torch.zeros(n, c.num_tokens, c.token_dim)
        mask = torch.ones(n, c.num_tokens, dtype=torch.bool)
        z = m.context(tokens, mask, torch.zeros(n, dtype=torch.long))
        for _ in range(3):
            m.head(torch.zeros(4 * n, c.token_dim), torch.zeros(4 * n, dtype=torch.long), z[:, :4].reshape(4 * n, -1))


def measure(models, args, cfg: float, stride: int) -> list:
    from leandit.evaluate.speed import measure_generation_speed

    return measure_generation_speed(models, args.batch_size, cfg_scale=cfg, num_iter=args.iterations,
                                    head_steps=args.head_steps, warmup=0, rounds=args.rounds, step_stride=stride,
                                    progress=lambda m: print(m, file=sys.stderr, flush=True))


def table(rows: list[tuple[float, list]]) -> str:
    lines = ["| model | blocks (enc + dec) | cfg | GMACs / image | s / image | in blocks | in head | rest "
             "| speed-up, loop | speed-up, blocks | iterations run (stride) | MACs covered |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for cfg, results in rows:
        for r in results:
            total = r.seconds_per_image
            share = lambda s: f"{_seconds(s)} s ({s / total:.0%})"  # noqa: E731
            ran = r.num_iter // r.step_stride
            lines.append(f"| {r.name} | {r.encoder_depth} + {r.decoder_depth} | {cfg:g} | {_seconds(r.flops_per_image / 2e9)} | "
                         f"{_seconds(total)} | {share(r.blocks_s)} | {share(r.head_s)} | {share(r.rest_s)} | "
                         f"**{r.speedup:.2f}x** | **{r.block_speedup:.2f}x** | {ran} of {r.num_iter} ({r.step_stride}) | "
                         f"{r.macs_coverage:.3f} |")
    return "\n".join(lines)


def _seconds(value: float) -> str:
    """1,234.5 / 12.3 / 0.0123: a value with about three significant digits, never in e-notation."""
    return f"{value:,.1f}" if value >= 10 else f"{value:.3g}" if value >= 0.001 else f"{value:.2e}"


def machine() -> str:
    return (f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads "
            f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), fp32, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="MAR-L", help="a named MAR size with optional overrides (default MAR-L)")
    parser.add_argument("--splits", default="8+8,16+0", help="pruned rows, ENC+DEC blocks kept (default 8+8,16+0)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=64)
    parser.add_argument("--head-steps", type=int, default=100)
    parser.add_argument("--stride", type=int, default=16, help="run the network at every STRIDE-th iteration (default 16)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--cfg", type=float, default=3.0, help="guided rows' scale (1: no guided rows; default 3.0)")
    parser.add_argument("--cfg-rows", type=int, default=2, help="guided rows: the first N models (default 2)")
    parser.add_argument("--cfg-stride", type=int, default=32, help="--stride of the guided rows (default 32)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table and the machine to this markdown file")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    load_before = os.getloadavg()
    model = make_model(args.model)
    models = [(f"{model.config.name or args.model} (full)", model)] + [pruned(model, s) for s in args.splits.split(",") if s]
    print(f"built {len(models)} models in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    rows = []
    with torch.inference_mode():
        warm_up(models, args.batch_size, 1.0)
        rows.append((1.0, measure(models, args, 1.0, args.stride)))
        if args.cfg != 1.0 and args.cfg_rows > 0:
            guided = models[: args.cfg_rows]
            warm_up(guided, args.batch_size, args.cfg)
            rows.append((args.cfg, measure(guided, args, args.cfg, args.cfg_stride)))
    minutes = (time.perf_counter() - started) / 60
    text = table(rows)
    command = "python benchmarks/mar_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    footer = (f"Machine: {machine()}. Command: `{command.strip()}` ({minutes:.1f} min in all). Batch {args.batch_size}, "
              f"{args.iterations} iterations, {args.head_steps} head steps, {args.rounds} round(s), no warm-up loop. Load "
              f"average (1, 5, 15 min) before: {', '.join(f'{v:.1f}' for v in load_before)}; after: "
              f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}.")
    print(text)
    print(footer)
    if args.out:
        args.out.write_text(f"{text}\n\n{footer}\n")


if __name__ == "__main__":
    main()
