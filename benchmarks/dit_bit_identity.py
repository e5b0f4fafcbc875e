"""leandit against the original DiT code (facebookresearch/DiT), on the same random weights.

    python benchmarks/dit_bit_identity.py PATH/TO/DiT [--configs DiT-S/2,DiT-B/4,DiT-XL/2]

PATH/TO/DiT is a checkout of https://github.com/facebookresearch/DiT (not part of this project,
never copied into it): its `models.py` and `diffusion/` are imported from that path at run
time. They need `timm` (for PatchEmbed, Attention and Mlp); `pip install timm` if it is missing.

For each named size the original network is built with its own code, every parameter but the
fixed position embedding is re-drawn (the adaLN-Zero init makes outputs trivially zero), the
state dict is saved as a plain .pt file and read back by `leandit.load_model` (the path a user
takes with a released checkpoint). Compared, as max |difference|:

- the forward pass (2 latents, timesteps 10 and 500, one class label and the null label);
- classifier-free guidance: the original `forward_with_cfg` on the doubled batch (3 of 4
  channels guided) against leandit's `forward_with_cfg` on the single batch;
- the position embedding against the original `get_2d_sincos_pos_embed`;
- on the first size only, the samplers: the respaced timesteps of `create_diffusion(N)` for
  N = 250, 50 and "ddim25", and one reverse step (DDPM, and DDIM with eta = 0) at the top, the
  middle and the last respaced timestep, with the same model output and the same noise.

Writes the table to stdout and, with --out, to a markdown file.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import leandit
from leandit.diffusion import GaussianDiffusion

HERE = Path(__file__).resolve().parent


def randomize_(module: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def compare_network(name: str, original_models, pos_embed_fn, folder: Path) -> list[tuple[str, str, float, float]]:
    """(size, what, max |difference|, max |value|) rows for one named size."""
    torch.manual_seed(0)
    original = original_models[name](input_size=32, num_classes=1000).eval()
    randomize_(original, seed=1)
    path = folder / f"{name.replace('/', '-')}-random.pt"
    torch.save(original.state_dict(), path)
    ours = leandit.load_model(path).eval()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 32, 32, generator=gen)
    t = torch.tensor([10, 500])
    y = torch.tensor([3, 1000])
    rows = []
    with torch.no_grad():
        a, b = original(x, t, y), ours(x, t, y)
        rows.append((name, "forward", max_diff(a, b), a.abs().max().item()))
        labels = torch.tensor([3, 207])
        doubled = original.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, torch.tensor([1000, 1000])]), 4.0)
        guided = ours.forward_with_cfg(x, t, labels, 4.0)
        rows.append((name, "guidance (cfg 4, 3 channels)", max_diff(doubled[:2], guided), doubled.abs().max().item()))
    grid = int(ours.pos_embed.shape[1] ** 0.5)
    expected = torch.from_numpy(pos_embed_fn(ours.pos_embed.shape[-1], grid)).float()[None]
    rows.append((name, "position embedding", max_diff(expected, ours.pos_embed), expected.abs().max().item()))
    path.unlink()
    return rows


def compare_samplers(create_diffusion, space_timesteps, name: str, original_models, folder: Path) -> list[tuple[str, str, float, float]]:
    torch.manual_seed(0)
    original = original_models[name](input_size=32, num_classes=1000).eval()
    randomize_(original, seed=1)
    rows = []
    base = GaussianDiffusion.dit()
    for spec in ("250", "50", "ddim25"):
        theirs = sorted(space_timesteps(1000, spec))
        ours = base.respaced(spec)
        mismatch = sum(a != b for a, b in zip(theirs, ours.timestep_map)) + abs(len(theirs) - len(ours.timestep_map))
        rows.append((name, f"respaced timesteps {spec} ({len(theirs)} steps): entries that differ", float(mismatch), float(max(theirs))))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 32, 32, generator=gen)
    y = torch.tensor([3, 1000])
    for steps in (250, 50):
        diffusion = create_diffusion(str(steps))
        ours = base.respaced(steps)
        for index in (steps - 1, steps // 2, 0):
            t = torch.full((2,), index, dtype=torch.long)
            with torch.no_grad():
                out = original(x, ours.model_timesteps(t), y)
                torch.manual_seed(4)
                theirs_ddpm = diffusion.p_sample(original, x, t, clip_denoised=False, model_kwargs={"y": y})["sample"]
                torch.manual_seed(4)
                ours_ddpm = ours.ddpm_step(out, x, t, lambda: torch.randn_like(x), False)
                theirs_ddim = diffusion.ddim_sample(original, x, t, clip_denoised=False, model_kwargs={"y": y}, eta=0.0)["sample"]
                ours_ddim = ours.ddim_step(out, x, t, lambda: torch.randn_like(x), 0.0, False)
            rows.append((name, f"DDPM step, {steps} steps, t index {index}", max_diff(theirs_ddpm, ours_ddpm), theirs_ddpm.abs().max().item()))
            rows.append((name, f"DDIM step, {steps} steps, t index {index}", max_diff(theirs_ddim, ours_ddim), theirs_ddim.abs().max().item()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("repo", type=Path, help="a checkout of facebookresearch/DiT")
    parser.add_argument("--configs", default="DiT-S/2,DiT-B/4,DiT-XL/2", help="named sizes (default DiT-S/2,DiT-B/4,DiT-XL/2)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    parser.add_argument("--commit", default=None, help="the checkout's commit, for the report (default: git rev-parse HEAD in it)")
    args = parser.parse_args()
    repo = args.repo.resolve()
    if not (repo / "models.py").is_file() or not (repo / "diffusion" / "respace.py").is_file():
        sys.exit(f"{repo} is not a checkout of facebookresearch/DiT (no models.py or diffusion/respace.py)")
    sys.path.insert(0, str(repo))
    from diffusion import create_diffusion  # noqa: E402  (the original code, from the checkout)
    from diffusion.respace import space_timesteps  # noqa: E402
    from models import DiT_models, get_2d_sincos_pos_embed  # noqa: E402

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    commit = args.commit
    if commit is None:
        try:
            commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        except OSError:
            commit = ""
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            rows += compare_network(name, DiT_models, get_2d_sincos_pos_embed, Path(tmp))
            print(*rows[-3:], sep="\n", flush=True)
        rows += compare_samplers(create_diffusion, space_timesteps, names[0], DiT_models, Path(tmp))
    import timm

    lines = [
        "# leandit against the original DiT code (same random weights)",
        "",
        f"Command: `python benchmarks/dit_bit_identity.py PATH/TO/DiT --configs {','.join(names)}` "
        f"({time.strftime('%Y-%m-%d')}). Original: facebookresearch/DiT at {commit or 'unknown commit'}, "
        f"imported from its checkout; timm {timm.__version__}. Machine: {platform.machine()}, torch {torch.__version__}, "
        "float32 on the CPU.",
        "",
        "| size | compared | max abs difference | max abs value |",
        "|---|---|---|---|",
    ]
    lines += [f"| {size} | {what} | {diff:.3g} | {scale:.3g} |" for size, what, diff, scale in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
