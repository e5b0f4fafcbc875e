"""What a routed (DiffCR) model runs: the learned kept ratio of every block in every timestep
region with the capacity k its schedule fixed and the MAC ratio of each region (read off the
model), and which tokens the blocks ran on for a few generated samples (measured while
sampling: the router's choice depends on the image).

    table = ratio_profile(model)                   # RatioProfile: ratios, schedule, MACs
    maps = token_maps(model, samples=4)            # TokenMaps: images and per-token counts

The token maps count, for every token of every sample at a sampling step, how many of the
blocks ran on it (0 .. depth; a token no block kept only passed through the residual path).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..backbones import backbone
from ..models.wrappers import peel_wrappers


def routed_model_of(model: nn.Module) -> nn.Module:
    """The `RoutedModel` in `model` (it, or a registered wrapper around it); a clear error
    for a model that does not route tokens."""
    from ..compress.routing import RoutedModel

    outer = backbone(model).outer
    if isinstance(outer, RoutedModel):
        return outer
    for _, layer in peel_wrappers(outer)[1]:
        if isinstance(layer, RoutedModel):
            return layer
    raise ValueError("this model does not route tokens (no DiffCR routers): make one with `leandit route`")


@dataclass
class RatioProfile:
    ratios: np.ndarray  # (L, R) learned kept ratios
    schedule: np.ndarray  # (L, R) capacities k the model runs
    macs_ratio_per_region: np.ndarray  # (R,) MACs of the schedule / dense, per region
    tokens: int
    bins: int
    objective: str  # "diffusion" (region 0 = least noisy) or "flow" (region 0 = noisiest)

    @property
    def depth(self) -> int:
        return self.schedule.shape[0]

    @property
    def regions(self) -> int:
        return self.schedule.shape[1]

    @property
    def kept_share(self) -> np.ndarray:
        """(L, R) the share of the tokens each block runs on: k / tokens."""
        return self.schedule / self.tokens

    def region_labels(self) -> list[str]:
        """The timesteps of each region, e.g. 't 0-249' (diffusion) or 't 0.00-0.25' (flow)."""
        R = self.regions
        if self.objective == "flow":
            return [f"t {g / R:.2f}-{(g + 1) / R:.2f}" for g in range(R)]
        return [f"t {g * 1000 // R}-{(g + 1) * 1000 // R - 1}" for g in range(R)]

    def header(self) -> list[str]:
        R = self.regions
        return ["block", *[f"ratio_region{g}" for g in range(R)], *[f"k_region{g}" for g in range(R)]]

    def rows(self) -> list[list]:
        """CSV rows, one per block: the learned ratio of every region, then its k."""
        return [[layer, *[f"{v:.4f}" for v in self.ratios[layer]], *[int(k) for k in self.schedule[layer]]]
                for layer in range(self.depth)]

    def summary(self) -> dict:
        return {
            "tokens": self.tokens, "bins": self.bins, "regions": self.region_labels(),
            "macs_ratio_per_region": [round(float(v), 4) for v in self.macs_ratio_per_region],
            "macs_ratio": round(float(self.macs_ratio_per_region.mean()), 4),
            "mean_kept_share": round(float(self.kept_share.mean()), 4),
        }


def ratio_profile(model: nn.Module) -> RatioProfile:
    """The ratio table of a routed model (refuses any other model)."""
    routed = routed_model_of(model)
    table = routed.ratio_table()
    return RatioProfile(
        ratios=np.asarray(table["ratios"], dtype=np.float64),
        schedule=np.asarray(table["schedule"], dtype=np.int64),
        macs_ratio_per_region=np.asarray(table["macs_ratio_per_region"], dtype=np.float64),
        tokens=int(table["tokens"]),
        bins=int(table["bins"]),
        objective=routed.objective,
    )


@dataclass
class TokenMaps:
    images: np.ndarray | None  # (n, H, W, C) uint8 generated samples (None: latents without a VAE)
    labels: list[int]  # (n,) their classes
    timesteps: np.ndarray  # (S,) the t of every sampling step (model calls), in sampling order
    counts: np.ndarray  # (S, n, T) how many blocks ran on each token at each step
    grid: tuple[int, int]  # the patch grid (rows, columns) of the T tokens
    depth: int

    def at(self, step: int) -> np.ndarray:
        """(n, rows, cols) the counts of a sampling step on the patch grid."""
        return self.counts[step].reshape(-1, *self.grid)

    def mean(self) -> np.ndarray:
        """(n, rows, cols) the counts averaged over all sampling steps."""
        return self.counts.mean(axis=0).reshape(-1, *self.grid)

    def nearest_steps(self, targets: list[float]) -> list[int]:
        """The sampling step whose t is closest to each target t."""
        return [int(np.abs(self.timesteps - t).argmin()) for t in targets]


def kept_counts(routed: nn.Module, batch: int) -> np.ndarray:
    """(batch, T) how many blocks ran on each token in the routed model's last forward (read
    from every block's `kept`: it records within `routed.recording()`)."""
    counts = torch.zeros(batch, routed.num_tokens, dtype=torch.long)
    for block in routed.routed_blocks:
        for images, index in block.kept:
            rows = torch.arange(batch) if images is None else images.cpu()
            one = torch.zeros(len(rows), routed.num_tokens, dtype=torch.long)
            one.scatter_(1, index.cpu().long(), 1)
            counts[rows] += one
    return counts.numpy()


def patch_grid(model: nn.Module, tokens: int) -> tuple[int, int]:
    """(rows, cols) of the tokens on the image: the input's height and width over the patch
    size, else the nearest square."""
    spec = backbone(model).spec
    shape = tuple(spec.input_shape)
    if len(shape) == 3:
        _, h, w = shape
        for p in range(1, h + 1):
            if (h // p) * (w // p) == tokens and h % p == 0 and w % p == 0:
                return h // p, w // p
    side = int(round(tokens ** 0.5))
    if side * side == tokens:
        return side, side
    return 1, tokens


@torch.no_grad()
def token_maps(model: nn.Module, samples: int = 4, seed: int = 0, steps: int | None = None,
               sampler: str | None = None, vae=None) -> TokenMaps:
    """Generate `samples` class-balanced images (classes 0, 1, ..) with the model's default
    sampler (or `sampler`, `steps`; no guidance) and, at every sampling step, count how many
    blocks ran on each token. A latent model's samples are decoded with `vae`; without one
    the maps come without images (`images` is None)."""
    from .sampling import generate, make_labels, to_uint8_images

    routed = routed_model_of(model)
    spec = backbone(model).spec
    if spec.conditioning.kind != "class":
        raise ValueError(f"token maps sample class-conditional models only (this one is {spec.conditioning.describe()})")
    y = make_labels(samples, spec.conditioning.num_classes)
    recorded_t: list[float] = []
    recorded: list[np.ndarray] = []

    def after_forward(module, args, kwargs, output) -> None:
        t = (kwargs["timestep"] if "timestep" in kwargs else args[1]).reshape(-1)
        recorded_t.append(float(t[0]))  # a sampling batch shares its t
        recorded.append(kept_counts(routed, t.shape[0]))

    handle = routed.register_forward_hook(after_forward, with_kwargs=True)
    try:
        with routed.recording():
            x = generate(model, y, sampler=sampler, steps=steps, cfg_scale=1.0, seed=seed, batch_size=len(y), progress=False)
    finally:
        handle.remove()
        for block in routed.routed_blocks:
            block.kept = []
    if not recorded:
        raise RuntimeError("sampling made no call of the routed model: nothing to map")
    images = None if spec.space == "latent" and vae is None else to_uint8_images(x, spec.space, vae)
    return TokenMaps(images=images, labels=[int(v) for v in y], timesteps=np.asarray(recorded_t),
                     counts=np.stack(recorded), grid=patch_grid(model, routed.num_tokens), depth=routed.depth)


def region_centres(profile: RatioProfile) -> list[float]:
    """The middle t of every timestep region (a t the token maps are shown at)."""
    R = profile.regions
    if profile.objective == "flow":
        return [(g + 0.5) / R for g in range(R)]
    return [(g + 0.5) * 1000 / R for g in range(R)]
