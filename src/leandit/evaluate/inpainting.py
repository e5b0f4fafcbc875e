"""Completing given images with an inpainting model (`leandit sample MODEL --inpaint MASKS --images IMAGES`).

The images (an ADM-layout .npz: arr_0 uint8 N x H x W x C, arr_1 class labels; or `digits`,
the 450 held-out digits of the 25 % stratified split the digits feature net also holds out)
are masked, completed by the model conditioned on the known pixels, the mask and the image's label
(arr_1; the null class completes from the known pixels alone), and the known
pixels are pasted back at the end, so a completion keeps every known pixel exactly (the model
only ever changes the unknown ones). Image i's noise and, for random kinds, its mask come from
seeds (seed, i): the parts of `leandit sample` resume and split across processes as usual.

`replacement_inpaint` is the naive reference for a model that was never trained to inpaint:
at every step the known region of x_t is replaced by the known image noised to that step
(the "replacement" method of score-based inpainting), diffusion models only.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..compress.step_cache import reset_step_caches
from ..backbones import backbone
from ..diffusion import PerSampleNoise, make_objective, mix_seed
from ..models.inpaint import InpaintModel, MaskSpec, inpaint_layer, parse_masks
from .sampling import model_fn_for, save_grid

MASK_SEED = 0x3A5C  # mixed with (seed, image index): a random mask kind or box per image
UNKNOWN_COLOUR = (200, 40, 40)  # how the grid shows unknown pixels of the masked input


def load_images(spec: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, H, W, C), labels (N,)) of an ADM-layout .npz or `digits`."""
    if spec == "digits":
        from .digits_features import split

        _, images, _, labels = split(0)
        return images, labels
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--images {spec}: no such file (pass an .npz with arr_0 = N x H x W x C uint8 and arr_1 = labels, or digits)")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "arr_0" not in data or "arr_1" not in data:
                raise ValueError(f"--images {spec}: needs arr_0 (the images) and arr_1 (their class labels), has {sorted(data.files)}")
            images, labels = data["arr_0"], data["arr_1"]
    except (OSError, EOFError) as err:
        raise ValueError(f"--images {spec}: not a readable .npz ({err})") from None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"--images {spec}: arr_0 must be N x H x W x C uint8, got {images.dtype} {images.shape}")
    if labels.shape != (len(images),):
        raise ValueError(f"--images {spec}: arr_1 must hold one label per image ({len(images)}), got shape {labels.shape}")
    return images, labels.astype(np.int64)


def to_model_space(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> (N, C, H, W) in [-1, 1], the inverse of `to_uint8_images`."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def masks_for(spec: MaskSpec, indices: Sequence[int], seed: int) -> torch.Tensor:
    """The masks (n, 1, S, S) of images `indices`, each from its own seed (seed, i)."""
    gens = [torch.Generator().manual_seed(mix_seed(seed, MASK_SEED, i)) for i in indices]
    uniforms = torch.stack([torch.rand(MaskSpec.UNIFORMS, generator=g) for g in gens]) if gens else torch.zeros(0, MaskSpec.UNIFORMS)
    return spec.draw(uniforms)


@torch.no_grad()
def complete(
    model: nn.Module,
    known: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    cfg_scale: float = 1.0,
    guided_channels: int | None = None,
    eta: float = 0.0,
    seed: int = 0,
    indices: Sequence[int] | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """Completions (N, C, H, W) in [-1, 1] of `known` (N, C, H, W) where `mask` (N, 1, H, W) is
    1, by an inpainting model; known pixels are pasted back. Noise as `generate`'s: (seed, i)."""
    layer = inpaint_layer(model)
    if layer is None:
        raise ValueError("this model is not an inpainting variant: fine-tune one with `leandit train --model MODEL --inpaint`")
    spec = backbone(model).spec
    objective = make_objective(spec)
    device = next(model.parameters()).device
    indices = list(range(len(known))) if indices is None else list(indices)
    options = {"eta": eta} if objective.kind == "diffusion" else {}
    model.eval()
    chunks = []
    for start in range(0, len(known), batch_size):
        part = slice(start, start + batch_size)
        k, m, y = known[part].to(device), mask[part].to(device), labels[part].to(device)
        noise = PerSampleNoise(seed, indices[part], device)
        reset_step_caches(model)  # each chunk is a trajectory of its own
        with layer.inpainting(k, m):  # guidance's doubled batch tiles the context
            x = objective.sample(model_fn_for(model, y, cfg_scale, guided_channels), lambda: noise.randn(spec.input_shape),
                                 sampler=sampler or objective.default_sampler, steps=steps,
                                 clip_denoised=spec.space == "pixel", **options)
        chunks.append((m * x.float() + (1 - m) * k).cpu())  # (n, C, H, W): the known pixels exactly
    return torch.cat(chunks) if chunks else known[:0].clone()


@torch.no_grad()
def replacement_inpaint(
    model: nn.Module, known: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, *, steps: int = 50, seed: int = 0,
    batch_size: int = 64,
) -> torch.Tensor:
    """The naive reference: a plain diffusion model samples with DDIM, and before every step the
    known region of x_t is replaced by q(x_t | known) (fresh noise from the image's seed)."""
    spec = backbone(model).spec
    if spec.objective != "diffusion":
        raise ValueError("replacement inpainting is written for diffusion models (DDIM)")
    objective = make_objective(spec)
    process = objective.respaced(steps) if steps != objective.num_timesteps else objective
    device = next(model.parameters()).device
    model.eval()
    chunks = []
    for start in range(0, len(known), batch_size):
        part = slice(start, start + batch_size)
        k, m, y = known[part].to(device), mask[part].to(device), labels[part].to(device)
        noise = PerSampleNoise(seed, range(start, start + len(k)), device)
        x = noise.randn(spec.input_shape)
        model_fn = model_fn_for(model, y)
        for i in range(process.num_timesteps - 1, -1, -1):
            t = torch.full((len(k),), i, device=device, dtype=torch.long)
            x = m * x + (1 - m) * process.q_sample(k, t, noise.randn(spec.input_shape))  # (n, C, H, W)
            out = model_fn(x, process.model_timesteps(t))
            x = process.ddim_step(out, x, t, lambda: noise.randn(spec.input_shape), 0.0, spec.space == "pixel")
        chunks.append((m * x.float() + (1 - m) * k).cpu())
    return torch.cat(chunks)


def masked_view(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """RGB uint8 (N, H, W, 3) of the known pixels, the unknown ones (masks (N, H, W) = 1)
    painted UNKNOWN_COLOUR."""
    rgb = np.repeat(images, 3, axis=3) if images.shape[3] == 1 else images.copy()
    rgb[masks.astype(bool)] = UNKNOWN_COLOUR  # (N, H, W, 3)
    return rgb


def save_inpainting_grid(path: Path, originals: np.ndarray, masks: np.ndarray, completions: np.ndarray,
                         columns: int | None = None) -> Path:
    """Rows of three: the masked inputs (unknown pixels (masks (N, H, W) = 1) red), their
    completions, the originals; a white row between one group of three and the next, so that a
    reader sees which rows belong together."""
    n = len(completions)
    columns = columns or min(n, 10)
    rgb = lambda a: np.repeat(a, 3, axis=3) if a.shape[3] == 1 else a  # noqa: E731
    rows = []
    for start in range(0, n, columns):
        part = slice(start, min(start + columns, n))
        if rows:
            rows.append(np.full((columns, *rgb(originals[:1]).shape[1:]), 255, dtype=np.uint8))
        for block in (masked_view(originals[part], masks[part]), rgb(completions[part]), rgb(originals[part])):
            pad = np.full((columns - len(block), *block.shape[1:]), 255, dtype=np.uint8)
            rows.append(np.concatenate([block, pad]))
    return save_grid(path, np.concatenate(rows), ncols=columns)


class InpaintingRun:
    """What `leandit sample --inpaint` completes: the images, their labels and masks, checked
    against the model before anything is written."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, masks: MaskSpec, seed: int, images_spec: str):
        self.images, self.labels, self.masks, self.seed, self.images_spec = images, labels, masks, seed, images_spec
        self.known = to_model_space(images)  # (N, C, H, W)

    @classmethod
    def for_command(cls, model: nn.Module, args: argparse.Namespace) -> "InpaintingRun | None":
        """None for ordinary sampling; a one-line error for every mismatch of model and options."""
        layer = inpaint_layer(model)
        if args.inpaint is None and args.images is None:
            if layer is not None:
                raise ValueError("this is an inpainting model: pass --inpaint MASKS --images IMAGES.npz|digits to complete images")
            return None
        if layer is None and backbone(model).spec.objective == "masked":
            raise ValueError("--inpaint/--images do not apply to MAR: leandit has no MAR inpainting sampler yet")
        if layer is None:
            raise ValueError(f"{args.model} is not an inpainting model, so it cannot take --inpaint/--images: "
                             f"fine-tune one with `leandit train --model {args.model} --inpaint --data ...`")
        if args.inpaint is None or args.images is None:
            raise ValueError("inpainting needs both --inpaint MASKS and --images IMAGES.npz|digits")
        if args.labels != "balanced":
            raise ValueError("--labels does not apply with --inpaint: each image keeps its own label (arr_1)")
        spec = backbone(model).spec
        if spec.space != "pixel":
            raise ValueError(f"--inpaint completes images in pixel space; this model works in {spec.space} space")
        masks = parse_masks(args.inpaint, spec.input_size)
        images, labels = load_images(args.images)
        shape = (spec.input_size, spec.input_size, spec.in_channels)
        if tuple(images.shape[1:]) != shape:
            raise ValueError(f"--images {args.images}: images are {'x'.join(map(str, images.shape[1:]))} (H x W x C), but the "
                             f"model takes {'x'.join(map(str, shape))}")
        # The null class is allowed: completing from the known pixels alone (no label).
        classes, null = spec.conditioning.num_classes, spec.conditioning.null_class
        allowed = classes + (1 if null == classes else 0)
        if len(labels) and (labels.min() < 0 or labels.max() >= allowed):
            raise ValueError(f"--images {args.images}: labels must be class ids in 0..{classes - 1}"
                             + (f" or {null} (the null class: no label)" if null == classes else ""))
        count = len(images) if args.num_samples is None else args.num_samples
        if not 1 <= count <= len(images):
            raise ValueError(f"--num-samples {count}: --images {args.images} holds {len(images)} images")
        return cls(images[:count], labels[:count], masks, args.seed, args.images)

    @property
    def num(self) -> int:
        return len(self.images)

    def settings(self) -> dict[str, Any]:
        from ..commands.sample import _files_stamp

        return {"inpaint": self.masks.text, "images": self.images_spec, "images_files": _files_stamp(self.images_spec)}

    def masks_of(self, indices: Sequence[int]) -> torch.Tensor:
        return masks_for(self.masks, indices, self.seed)

    def complete(self, model: nn.Module, indices: range, **options: Any) -> torch.Tensor:
        part = slice(indices.start, indices.stop)
        labels = torch.from_numpy(self.labels[part])
        return complete(model, self.known[part], self.masks_of(indices), labels, seed=self.seed, indices=indices, **options)

    def write_extras(self, out: Path, completions: np.ndarray | None, grid: int, columns: int | None) -> list[Path]:
        """masks.npz (arr_0 = N x H x W uint8, 1 = generated) and, for grid > 0, the grid of
        masked input / completion / original of the first `grid` images."""
        from ..files import savez_atomically

        masks = self.masks_of(range(self.num))[:, 0].to(torch.uint8).numpy()  # (N, H, W)
        written = [savez_atomically(Path(out) / "masks.npz", arr_0=masks)]
        if grid > 0:
            k = min(grid, self.num)
            written.append(save_inpainting_grid(Path(out) / "grid.png", self.images[:k], masks[:k],
                                                completions[:k], columns))
        return written


__all__ = ["InpaintModel", "InpaintingRun", "complete", "load_images", "masks_for", "replacement_inpaint",
           "save_inpainting_grid", "to_model_space"]
