"""leandit's MAR against the original MAR code (LTH14/mar, MIT), on the same random weights.

    python benchmarks/mar_bit_identity.py PATH/TO/mar [--configs tiny,patch2,MAR-B] [--out FILE.md]

PATH/TO/mar is a checkout of https://github.com/LTH14/mar (not part of this project, never
copied into it): its `models/mar.py`, `models/diffloss.py` and `diffusion/` are imported from
that path at run time. They need `timm` and `scipy`; `pip install timm` if it is missing.
The original calls `.cuda()` in its sampling loop; on a CPU the script makes `Tensor.cuda` a
no-op for the duration.

For each configuration the original network is built with its own code, every parameter is
re-drawn (its zero-initialised head layers would make the head's output trivially zero), and
the weights are saved as a release-style `checkpoint-last.pth` ({"model", "model_ema",
"optimizer", "epoch", "args": argparse.Namespace}) that `leandit.load_model` reads, the path a
user takes with a released checkpoint. Compared, as max |difference| (float32, eval mode):

- encoder and decoder outputs for a fixed mask, with class labels and with the fake latent
  (the unconditional branch);
- the head's prediction on rows (x_t, t, z);
- the head's training loss per token (epsilon MSE + VB, cosine schedule) for the same
  timesteps and noise;
- the head's sampling (100 respaced DDPM steps, temperature 0.9) with and without guidance,
  fed the same noise;
- the generation schedule: the number of tokens predicted and the guidance scale at every
  step of `sample_tokens` (64 steps, cfg 3, linear) against leandit's.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import platform
import sys
import tempfile
from pathlib import Path

import torch

import leandit
from leandit.diffusion.masked import MaskedDiffusion, MaskedDraw, guidance_at, unknown_after_step

CONFIGS = {
    # name: (original MAR kwargs, batch)
    "tiny": dict(img_size=64, vae_stride=16, patch_size=1, encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=4,
                 decoder_embed_dim=96, decoder_depth=3, decoder_num_heads=4, vae_embed_dim=16, buffer_size=8,
                 class_num=10, diffloss_d=2, diffloss_w=64),
    "patch2": dict(img_size=128, vae_stride=16, patch_size=2, encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=2,
                   decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=2, vae_embed_dim=16, buffer_size=4,
                   class_num=10, diffloss_d=3, diffloss_w=128),
    "MAR-B": dict(img_size=256, vae_stride=16, patch_size=1, encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                  decoder_embed_dim=768, decoder_depth=12, decoder_num_heads=12, vae_embed_dim=16, buffer_size=64,
                  class_num=1000, diffloss_d=6, diffloss_w=1024),
}


@contextlib.contextmanager
def cuda_is_cpu():
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def randomize_(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def compare(name: str, mar_module, kwargs: dict, folder: Path) -> list[tuple[str, str, float, float]]:
    from functools import partial

    norm = partial(torch.nn.LayerNorm, eps=1e-6)
    original = mar_module.MAR(norm_layer=norm, mlp_ratio=4.0, **kwargs).eval()
    randomize_(original, seed=0)
    sd = original.state_dict()
    namespace = argparse.Namespace(model="mar", img_size=kwargs["img_size"], vae_stride=kwargs["vae_stride"],
                                   patch_size=kwargs["patch_size"], vae_embed_dim=kwargs["vae_embed_dim"],
                                   mask_ratio_min=0.7, label_drop_prob=0.1, diffusion_batch_mul=4,
                                   num_sampling_steps="100", attn_dropout=0.1, proj_dropout=0.1,
                                   buffer_size=kwargs["buffer_size"], diffloss_d=kwargs["diffloss_d"],
                                   diffloss_w=kwargs["diffloss_w"], class_num=kwargs["class_num"])
    path = folder / f"{name}-checkpoint-last.pth"
    torch.save({"model": sd, "model_ema": sd, "optimizer": {}, "epoch": 1, "args": namespace}, path)
    released = kwargs["encoder_embed_dim"] in (768, 1024, 1280)  # other widths need their head count
    model = leandit.load_model(path, num_heads=None if released else kwargs["encoder_num_heads"]).eval()
    rows = []

    def row(what: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
        rows.append((name, what, max_diff(ours, theirs), theirs.abs().max().item()))

    gen = torch.Generator().manual_seed(1)
    n, length, c = 2, original.seq_len, original.token_embed_dim
    tokens = torch.randn(n, length, c, generator=gen)
    unknown = math.ceil(length * 0.75)
    order = torch.rand(n, length, generator=gen).argsort(dim=1)
    mask = torch.zeros(n, length).scatter(1, order[:, :unknown], 1.0)  # the original's float mask
    labels = torch.tensor([3, 7])
    with torch.no_grad():
        for branch, theirs_emb, ours_labels in (("class", original.class_emb(labels), labels),
                                                ("fake latent", original.fake_latent.repeat(n, 1),
                                                 torch.full_like(labels, model.null_class))):
            enc_theirs = original.forward_mae_encoder(tokens, mask, theirs_emb)
            enc_ours = model.encode(tokens, mask.bool(), ours_labels)
            row(f"encoder output ({branch})", enc_ours, enc_theirs)
            dec_theirs = original.forward_mae_decoder(enc_theirs, mask)
            dec_ours = model.decode(enc_ours, mask.bool())
            row(f"decoder output ({branch})", dec_ours, dec_theirs)
        z = dec_theirs.reshape(n * length, -1)
        x = torch.randn(n * length, c, generator=gen)
        t = torch.randint(0, 1000, (n * length,), generator=gen)
        row("head prediction", model.head(x, t, z), original.diffloss.net(x, t, z))

        # Training loss per token, same timesteps and noise (the original averages it over the
        # masked rows; leandit averages each image's rows, which is the same with equal counts).
        objective = MaskedDiffusion.for_config(model.config)
        index = order[:, :unknown]
        steps = torch.randint(0, 1000, (n, unknown), generator=gen)
        noise = torch.randn(n, unknown, c, generator=gen)
        images = leandit.diffusion.masked.unpatchify(tokens, model.config.patch_size, model.config.in_channels)
        ours = objective.training_losses(lambda xt, tt: model(xt, tt, labels), images, MaskedDraw(mask.bool(), index, steps), noise)
        z_theirs = original.forward_mae_decoder(original.forward_mae_encoder(tokens, mask, original.class_emb(labels)), mask)
        pick = lambda v: v.gather(1, index.unsqueeze(-1).expand(n, unknown, v.shape[-1])).reshape(n * unknown, -1)  # noqa: E731
        theirs = original.diffloss.train_diffusion.training_losses(
            original.diffloss.net, pick(tokens), steps.reshape(-1), dict(c=pick(z_theirs)), noise=noise.reshape(n * unknown, c))
        row("head training loss (per image)", ours["loss"], theirs["loss"].reshape(n, unknown).mean(dim=1))

        # Head sampling with the same noise: the original draws the start noise, then one
        # randn_like per DDPM step over the (doubled, under guidance) batch and keeps the
        # conditional half.
        rows_z = z[:6]
        for cfg in (1.0, 2.5):
            torch.manual_seed(5)
            if cfg == 1.0:
                theirs = original.diffloss.sample(rows_z, temperature=0.9, cfg=cfg)
            else:
                theirs = original.diffloss.sample(torch.cat([rows_z, z[6:12]]), temperature=0.9, cfg=cfg)[:6]
            torch.manual_seed(5)
            first = [True]

            def noise_fn() -> torch.Tensor:
                if first[0] or cfg == 1.0:
                    first[0] = False
                    return torch.randn(6, c)
                return torch.randn(12, c)[:6]

            ours = objective.sample_head(model, rows_z, noise_fn, unconditional=None if cfg == 1.0 else z[6:12],
                                         cfg_scale=cfg, temperature=0.9)
            row(f"head sampling, 100 DDPM steps, cfg {cfg}", ours, theirs)

    # The generation schedule: what the original's loop predicts and guides at every step.
    seen: list[tuple[int, float]] = []

    def record(z_rows, temperature, cfg):
        seen.append((z_rows.shape[0], float(cfg)))
        return torch.zeros(z_rows.shape[0], c)

    original.diffloss.sample = record
    num_iter, cfg = 64 if length >= 64 else length, 3.0
    with torch.no_grad():
        original.sample_tokens(1, num_iter=num_iter, cfg=cfg, labels=torch.tensor([1]))
    ours_schedule, left = [], length
    for step in range(num_iter):
        after = unknown_after_step(step, num_iter, length, left)
        now = 0 if step == num_iter - 1 else after
        ours_schedule.append((2 * (left - now), guidance_at(cfg, "linear", length, after)))
        left = now
    counts = max(abs(a[0] - b[0]) for a, b in zip(ours_schedule, seen))
    scales = max(abs(a[1] - b[1]) for a, b in zip(ours_schedule, seen))
    rows.append((name, f"generation schedule: tokens per step ({num_iter} steps)", float(counts), float(max(s[0] for s in seen))))
    rows.append((name, "generation schedule: guidance scale per step", scales, cfg))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mar", type=Path, help="a checkout of https://github.com/LTH14/mar")
    parser.add_argument("--configs", default="tiny,patch2,MAR-B")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(args.mar))
    from models import mar as mar_module  # the original's, from the checkout

    torch.set_grad_enabled(True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, cuda_is_cpu():
        for name in args.configs.split(","):
            rows += compare(name, mar_module, CONFIGS[name], Path(tmp))
    lines = [
        "# leandit's MAR against the original MAR code, same random weights",
        "",
        f"`python benchmarks/mar_bit_identity.py PATH/TO/mar --configs {args.configs}` on {platform.processor() or platform.machine()} "
        f"(torch {torch.__version__}, float32, CPU).",
        "",
        "| config | compared | max abs difference | max abs value |",
        "|---|---|---|---|",
        *(f"| {c} | {w} | {d:.3g} | {v:.3g} |" for c, w, d, v in rows),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
