"""A fixed calibration set and the loss every depth method is scored with.

The calibration loss is the model's own objective on a fixed set of (x0, label, timestep,
noise): the same images, the same noise and the same timesteps for every mask, so the losses
of two masks (or two methods) differ only because of the blocks they keep. Timesteps are
spread evenly over the whole range (ShortGPT-style scores computed on clean latents at small
t describe a regime the sampler barely visits).

The loss is the objective's MSE term: epsilon MSE for DiT (also with a learned variance,
whose VB term only trains the variance head and is dominated by its t = 0 values),
velocity MSE for SiT, and the head's epsilon MSE over the unknown tokens for MAR (its
objective's `calibration_inputs`: a fixed mask per image at the median training ratio, every
unknown token once, head timesteps spread evenly over the range).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from ...backbones import Cond, backbone, cond_slice, cond_to
from ...diffusion import PerSampleNoise, make_objective
from ...diffusion.gaussian import GaussianDiffusion
from ...models.blocks import block_list, running_blocks


@dataclass
class CalibrationSet:
    """Noised inputs ready to feed the model: x_t (N, C, H, W), the model timesteps t (N,),
    the conditioning y (labels (N,) or text embeddings, see `leandit.backbones`), and the
    target the MSE compares with (N, C, H, W).

    For MAR (the masked objective) x_t is a `MaskedTokens` (tokens, mask, head rows), t the
    head timesteps (N, M) and the target the rows' noise (N, M, C); `channel_dim` says where
    a prediction's channels are (1 for images, -1 for token rows), so the MSE compares the
    first C channels of the prediction (its epsilon, not the learned variance)."""

    xt: Any  # (N, C, H, W) tensor, or a MaskedTokens
    t: torch.Tensor
    y: Cond
    target: torch.Tensor
    channel_dim: int = 1

    def __len__(self) -> int:
        return len(self.xt)

    def batches(self, batch_size: int, device: torch.device | str) -> Iterator[tuple[Any, ...]]:
        for start in range(0, len(self), batch_size):
            sl = slice(start, start + batch_size)
            yield (self.xt[sl].to(device), self.t[sl].to(device), cond_to(cond_slice(self.y, sl), device),
                   self.target[sl].to(device))


def calibration_indices(dataset: Dataset, size: int, seed: int = 0) -> list[int]:
    """`size` items drawn without replacement by a seeded permutation, one variant per image:
    latent shards are stored class by class with both flips of an image side by side, so the
    first items would be one class, twice."""
    variants = int(getattr(dataset, "variants", 1))
    images = len(dataset) // variants
    if size < 1:
        raise ValueError(f"calibration size must be at least 1, got {size}")
    if images < size:
        raise ValueError(f"the data has {images} images, fewer than the calibration size {size}; pass a smaller --calibration-size")
    order = torch.randperm(images, generator=torch.Generator().manual_seed(seed))[:size]
    return [int(i) * variants for i in order]


def make_calibration_set(model: nn.Module, dataset: Dataset, size: int = 256, seed: int = 0) -> CalibrationSet:
    """`size` images of `dataset` chosen by `seed`, noised at timesteps spread evenly over the
    whole range with noise fixed by `seed`. Labels are kept (no label dropout)."""
    items = [dataset[i] for i in calibration_indices(dataset, size, seed)]
    x0 = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x, _ in items])  # (N, C, H, W)
    y = default_collate([torch.as_tensor(c) if not isinstance(c, dict) else c for _, c in items])  # (N,) or text
    objective = make_objective(backbone(model).spec)
    if hasattr(objective, "calibration_inputs"):  # MAR: a fixed mask, head rows and timesteps per image
        inputs, steps, noise = objective.calibration_inputs(x0, seed)  # MaskedTokens, (N, M), (N, M, C)
        return CalibrationSet(inputs, steps, y, noise, channel_dim=-1)
    noise = PerSampleNoise(seed, range(size)).randn(x0.shape[1:])  # (N, C, H, W)
    # Midpoints of `size` equal slices of the timestep range, then shuffled (fixed) so every
    # batch spans the whole range.
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    fraction = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    fraction = fraction[order]
    if isinstance(objective, GaussianDiffusion):
        t = (fraction * objective.num_timesteps).long().clamp(max=objective.num_timesteps - 1)
        xt = objective.q_sample(x0, t, noise)
        return CalibrationSet(xt, objective.model_timesteps(t), y, noise)
    t = fraction.float()
    xt, velocity = objective.interpolate(x0, noise, t)
    return CalibrationSet(xt, t, y, velocity)


@torch.no_grad()
def calibration_loss(
    model: nn.Module,
    calibration: CalibrationSet,
    kept: Sequence[int] | None = None,
    batch_size: int = 256,
) -> float:
    """Mean MSE of the model's prediction over the calibration set, running only the blocks
    `kept` (all when None)."""
    device = next(model.parameters()).device
    adapter = backbone(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        context = running_blocks(model, kept) if kept is not None else contextlib.nullcontext()
        with context:
            for xt, t, y, target in calibration.batches(batch_size, device):
                out = adapter.predict(xt, t, y).float()  # (N, C_out, H, W) or (N, M, 2C)
                dim = calibration.channel_dim % out.dim()
                out = out.narrow(dim, 0, target.shape[dim])  # epsilon / velocity, not the variance
                per_item = ((out - target) ** 2).mean(dim=tuple(range(1, target.dim())))  # (N,)
                total += float(per_item.sum())
                count += per_item.shape[0]
    finally:
        model.train(was_training)
    return total / count


@torch.no_grad()
def block_inputs_outputs(
    model: nn.Module,
    calibration: CalibrationSet,
    reduce: Callable[[int, torch.Tensor, torch.Tensor], None],
    batch_size: int = 256,
) -> None:
    """Run the full model over the calibration set and call `reduce(index, x_in, x_out)` for
    every block (combined index: MAR's encoder blocks, then its decoder blocks) and batch with
    the block's input and output tokens (N, T, D). A block's input is its first positional
    argument (DiT's and MAR's blocks are called as block(x, ...)) or `hidden_states`."""
    device = next(model.parameters()).device
    handles = []

    def hook(index):
        def capture(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[-1] if isinstance(output, tuple) else output
            reduce(index, x_in.float(), x_out.float())

        return capture

    for index, block in enumerate(block_list(model)):
        handles.append(block.register_forward_hook(hook(index), with_kwargs=True))
    adapter = backbone(model)
    was_training = model.training
    model.eval()
    try:
        for xt, t, y, _ in calibration.batches(batch_size, device):
            adapter.predict(xt, t, y)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()


__all__ = ["CalibrationSet", "block_inputs_outputs", "calibration_loss", "make_calibration_set"]
