"""leandit's SiT samplers against SiT's own `transport` code (willisma/SiT), on the same model
and the same noise.

    python benchmarks/sit_sampler_identity.py PATH/TO/SiT [--out benchmarks/sit_sampler_identity.md]

PATH/TO/SiT is a checkout of https://github.com/willisma/SiT (not part of this project, never
copied into it): its `transport/` package is imported from that path at run time (it needs
torchdiffeq, which leandit installs). A small random SiT (2 blocks of width 64, 4 latent
channels, 8x8) drives both sides: SiT's `Sampler(create_transport("Linear", "velocity"))`
and `LinearFlow.sample`. The noise is the same stream: both start from one seeded draw and take
every Euler-Maruyama increment from `torch.randn` in the same order.

Compared, as max |difference| of the final samples: SiT's SDE (Euler-Maruyama, 50 steps) for
each diffusion form with last step Mean, and the sigma form with every last step; its ODE with
dopri5 (atol 1e-6, rtol 1e-3, 50 grid times) and the fixed-grid euler and heun2 (51 grid times
= leandit's `--steps 50`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import leandit
from leandit.diffusion import LinearFlow
from leandit.diffusion.sit_samplers import SDESettings

SHAPE = (4, 4, 8, 8)
SDE_CASES = [("sigma", "Mean"), ("sigma", "Tweedie"), ("sigma", "Euler"), ("sigma", None), ("linear", "Mean"),
             ("decreasing", "Mean"), ("increasing-decreasing", "Mean")]
# SiT's path.py spells this form "inccreasing-decreasing" (its command line's spelling fails).
SIT_FORM_NAMES = {"increasing-decreasing": "inccreasing-decreasing"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sit", type=Path, help="a checkout of willisma/SiT")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.sit))
    from transport import Sampler, create_transport  # SiT's own code

    torch.manual_seed(0)
    model = leandit.build_model("SiT-S/2", input_size=8, in_channels=4, hidden_size=64, num_heads=2, depth=2,
                                num_classes=10, space="latent").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # past adaLN-Zero's zeros
    y = torch.tensor([1, 2, 3, 4])
    sampler, flow = Sampler(create_transport("Linear", "velocity")), LinearFlow()

    def sit_model(x, t, y):  # SiT's samplers take the velocity channels
        return model(x, t, y)[:, : SHAPE[1]]

    def ours_fn(x, t):
        return model(x, t, y)

    rows = []
    with torch.no_grad():
        for form, last in SDE_CASES:
            torch.manual_seed(5)
            z = torch.randn(SHAPE)
            sit = sampler.sample_sde(sampling_method="Euler", diffusion_form=SIT_FORM_NAMES.get(form, form), diffusion_norm=1.0,
                                     last_step=last, last_step_size=0.04, num_steps=50)(z, sit_model, y=y)[-1]
            torch.manual_seed(5)
            ours = flow.sample(ours_fn, lambda: torch.randn(SHAPE), sampler="sde", steps=50,
                               sde=SDESettings(form=form, last_step=(last or "none").lower()))
            rows.append((f"SDE, {form}, last step {last}", float((sit - ours).abs().max()), float(ours.abs().max())))
        for method, ours_name in (("dopri5", "dopri5"), ("euler", "euler"), ("heun2", "heun")):
            torch.manual_seed(6)
            z = torch.randn(SHAPE)
            grid = 50 if method == "dopri5" else 51
            sit = sampler.sample_ode(sampling_method=method, num_steps=grid, atol=1e-6, rtol=1e-3)(z, sit_model, y=y)[-1]
            ours = flow.sample(ours_fn, lambda: z.clone(), sampler=ours_name, steps=grid if method == "dopri5" else grid - 1)
            rows.append((f"ODE, {method} ({grid} grid times) vs --sampler {ours_name}", float((sit - ours).abs().max()),
                         float(ours.abs().max())))
    lines = ["| sampler | max abs difference | max abs sample |", "|---|---|---|"]
    lines += [f"| {name} | {diff:.3g} | {size:.3g} |" for name, diff, size in rows]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(f"`python benchmarks/sit_sampler_identity.py PATH/TO/SiT` (torch {torch.__version__}, CPU, float32)\n\n{table}\n")


if __name__ == "__main__":
    main()
