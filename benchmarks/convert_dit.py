"""How far apart a DiT's outputs are before and after `leandit convert`, at DiT-XL/2 size.

    PYTHONPATH=src python benchmarks/convert_dit.py [--size DiT-XL/2] [--threads 2]

Builds a DiT-XL/2 (256x256: 32x32x4 latents, 28 blocks, hidden 1152) with DiT-like random
weights: the DiT initialisation (Xavier linears, N(0, 0.02) embedders, sin-cos positions),
then N(0, 0.02) for the layers adaLN-Zero starts at zero (the 28 modulations and the output
layer), so that every block does something. No released weights are read (no network).

Prints a markdown table of max/mean |diff| of the outputs per timestep for
- original -> diffusers (the weights copied exactly; diffusers' time shift 1 vs the original 0),
- the same weights in leandit with time shift 1 vs diffusers (isolates the shift),
- diffusers -> leandit (exact direction),
and whether the round trip original -> diffusers -> leandit gives back every tensor bit for bit.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import leandit
from leandit.models.diffusers_dit import diffusers_to_dit, dit_to_diffusers

# DiT timesteps 0..999 and SiT-style times in [0, 1] (the same embedder takes both).
TIMES = [0.0, 0.5, 1.0, 10.0, 100.0, 250.0, 500.0, 999.0]


def dit_like_(model: leandit.DiT, seed: int = 0, std: float = 0.02) -> leandit.DiT:
    torch.manual_seed(seed)
    model.initialize_weights()
    gen = torch.Generator().manual_seed(seed)
    zero_init = [*(b.adaLN_modulation[-1] for b in model.blocks), model.final_layer.adaLN_modulation[-1], model.final_layer.linear]
    with torch.no_grad():
        for layer in zero_init:
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


@torch.no_grad()
def outputs(model, x, t, y) -> torch.Tensor:
    out = model(x, t, y)
    return out if isinstance(out, torch.Tensor) else out.sample  # (N, C_out, H, W)


def rows(name: str, a: torch.Tensor, b: torch.Tensor) -> list[str]:
    diff = (a - b).abs().flatten(1)  # (N, C*H*W)
    scale = a.abs().flatten(1).mean(1)  # (N,)
    lines = [f"| {name} | all | {diff.max().item():.3g} | {diff.mean().item():.3g} | {a.abs().mean().item():.3g} |"]
    for i, t in enumerate(TIMES):
        lines.append(f"| | t = {t:g} | {diff[i].max().item():.3g} | {diff[i].mean().item():.3g} | {scale[i].item():.3g} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="DiT-XL/2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import diffusers
    from diffusers import DiTTransformer2DModel  # noqa: F401  (imported before the timings: seconds on its own)

    model = dit_like_(leandit.build_model(args.size), seed=args.seed)
    c = model.config
    gen = torch.Generator().manual_seed(args.seed + 1)
    n = len(TIMES)
    x = torch.randn(n, c.in_channels, c.input_size, c.input_size, generator=gen)  # (N, C, H, W)
    t = torch.tensor(TIMES)  # (N,)
    y = torch.randint(0, c.num_classes, (n,), generator=gen)  # (N,)

    start = time.perf_counter()
    converted = dit_to_diffusers(model)
    to_diffusers_s = time.perf_counter() - start
    original_out = outputs(model, x, t, y)
    diffusers_out = outputs(converted, x, t, y)
    model.t_embedder.freq_shift = 1.0  # the same weights with diffusers' time features
    shifted_out = outputs(model, x, t, y)
    model.t_embedder.freq_shift = 0.0

    start = time.perf_counter()
    back = diffusers_to_dit(converted)  # leandit_info restores the original's config
    to_leandit_s = time.perf_counter() - start
    original_sd, back_sd = model.state_dict(), back.state_dict()
    bit_exact = back.config == c and original_sd.keys() == back_sd.keys() and all(torch.equal(back_sd[k], v) for k, v in original_sd.items())
    del model, back, original_sd, back_sd

    exact = diffusers_to_dit(converted, info={})  # computes what diffusers computes
    exact_out = outputs(exact, x, t, y)

    print(f"# {args.size}: {sum(p.numel() for p in converted.parameters()) / 1e6:.1f} M diffusers parameters "
          f"({c.depth} blocks, hidden {c.hidden_size}, {c.num_tokens} tokens), seed {args.seed}")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, float32 CPU; "
          f"torch {torch.__version__}, diffusers {diffusers.__version__}")
    print(f"conversion time: to diffusers {to_diffusers_s:.1f} s, back to leandit {to_leandit_s:.1f} s")
    print(f"round trip original -> diffusers -> leandit: config and every tensor bit-exact = {bit_exact}")
    print()
    print("| comparison | input | max abs diff | mean abs diff | mean abs output |")
    print("|---|---|---|---|---|")
    for line in (rows("original (shift 0) vs diffusers", original_out, diffusers_out)
                 + rows("same weights, leandit shift 1 vs diffusers", shifted_out, diffusers_out)
                 + rows("diffusers vs diffusers -> leandit", diffusers_out, exact_out)):
        print(line)


if __name__ == "__main__":
    main()
