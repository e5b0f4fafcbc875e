"""An inpainting variant of a class-conditional DiT/SiT: the known image and the mask as extra
input channels, added through a second, zero-initialised patch embedding.

    model = InpaintModel(leandit.load_model("digits-teacher"))    # equals the base model exactly
    with model.inpainting(known, mask):                           # (N, C, H, W), (N, 1, H, W)
        out = model(x, t, y)                                      # or a sampler, guidance, a wrapper
    out = model(x, t, y, known=known, mask=mask)                  # the same, for a direct call

The mask convention (stored with the model): mask 1 = unknown, to be generated; 0 = known, kept.
The extra input is `[known * (1 - mask), mask]` (C + 1 channels): known pixels as they are,
unknown ones zeroed, and the mask itself, because a zero is also a valid pixel value (mid-grey
in [-1, 1]) and only the mask channel tells "unknown" from "known to be zero".

It is a wrapper, not a new network: the backbone's own forward runs unchanged, and a forward
hook on its patch embedding adds the extra tokens to the image tokens (before the positions).
Its weights and bias start at zero, so at initialisation the model is the base model bit for
bit, whatever the known image and the mask. The blocks stay the backbone's (`block_list` of an
InpaintModel is the backbone's list, not a copy), so a routing or dynamic wrapper can wrap an
InpaintModel and swap the block list; a list set on the InpaintModel (as `running_blocks`
or such a wrapper does) is set on the backbone.

Without a known image and mask, the model is asked for a whole new image: nothing known
(mask all ones, known zero). The training kind `all` teaches it that case.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator

import numpy as np
import torch
from torch import nn

from .dit import DiT

MASK_CONVENTION = "mask 1 = unknown (generated), 0 = known (kept); extra input [known * (1 - mask), mask]"
TABLE_VERSION = 1


class InpaintModel(nn.Module):
    """`inner` (a leandit DiT/SiT) conditioned on a known image and a mask.

    Args:
        inner: the backbone; it keeps its weights, its state dict names and its forward.
        trained_masks: the mask spec it was fine-tuned with (a record, shown by `leandit info`).

    `forward(x, t, y, known=None, mask=None)`: x (B, C, H, W), t (B,), y (B,); known (N, C, H, W)
    and mask (N, 1, H, W) from the call or from `inpainting(known, mask)`, where B is N or a
    whole multiple of it: classifier-free guidance runs [cond; uncond] as one batch of 2N, so
    the context is tiled to follow it.
    """

    def __init__(self, inner: nn.Module, trained_masks: str | None = None):
        super().__init__()
        if type(inner).__name__ == "MAR":
            raise ValueError("inpainting fine-tuning does not apply to MAR: it already predicts unknown tokens from known "
                             "ones (leandit has no MAR inpainting sampler yet)")
        if type(inner) is not DiT:
            name = type(inner).__name__
            raise ValueError(
                f"inpainting wraps a plain leandit DiT/SiT (leandit.models.dit.DiT), not a {name}: "
                + ("make the inpainting model first, then compress it" if hasattr(inner, "inner") or hasattr(inner, "backbone")
                   else "convert a diffusers DiT with `leandit convert --to leandit`")
            )
        if _HOOK_FLAG in inner.x_embedder.__dict__:
            raise ValueError("this backbone is already inside an InpaintModel: wrap each backbone once")
        c = inner.config
        # Sub-modules named "blocks" go to the backbone (see _BlocksToInner); `inner` first.
        self.__dict__["_modules"] = _BlocksToInner()
        self.inner = inner
        self.trained_masks = trained_masks
        self.known_embedder = nn.Conv2d(c.in_channels + 1, c.hidden_size, kernel_size=c.patch_size, stride=c.patch_size)
        nn.init.zeros_(self.known_embedder.weight)  # zero: the base model exactly at initialisation
        nn.init.zeros_(self.known_embedder.bias)
        self._context: tuple[torch.Tensor, torch.Tensor] | None = None
        inner.x_embedder.__dict__[_HOOK_FLAG] = None  # the pending extra tokens of the running call
        inner.x_embedder.register_forward_hook(_add_known_tokens)

    # -- what wrappers and adapters see --------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # The block list is the backbone's (block_list(self) finds it; no copy is held
            # here), and so are its provenance and compression history until set on the wrapper.
            if name in _FROM_INNER:
                return getattr(self.inner, name)
            raise

    # -- the known image and the mask ----------------------------------------------------------
    @contextlib.contextmanager
    def inpainting(self, known: torch.Tensor, mask: torch.Tensor) -> Iterator["InpaintModel"]:
        """Every forward inside conditions on `known` (N, C, H, W) and `mask` (N, 1, H, W)."""
        self.check_context(known, mask)
        previous, self._context = self._context, (known, mask)
        try:
            yield self
        finally:
            self._context = previous

    def check_context(self, known: torch.Tensor, mask: torch.Tensor) -> None:
        c = self.inner.config
        image = (c.in_channels, c.input_size, c.input_size)
        if known.dim() != 4 or tuple(known.shape[1:]) != image:
            raise ValueError(f"the known image must be (N, {', '.join(map(str, image))}), got {tuple(known.shape)}")
        if tuple(mask.shape) != (known.shape[0], 1, *image[1:]):
            raise ValueError(f"the mask must be (N, 1, {image[1]}, {image[2]}) for N = {known.shape[0]} images, got {tuple(mask.shape)}")

    def extra_input(self, known: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[known * (1 - mask), mask]: (N, C + 1, H, W)."""
        mask = mask.to(known.dtype)
        return torch.cat([known * (1 - mask), mask], dim=1)  # (N, C + 1, H, W)

    def _context_for(self, x: torch.Tensor, known: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        if (known is None) != (mask is None):
            raise ValueError("pass both known= and mask= (or neither)")
        if known is None and self._context is not None:
            known, mask = self._context
        if known is None:  # nothing known: a whole new image
            b, _, h, w = x.shape
            known, mask = torch.zeros_like(x), torch.ones(b, 1, h, w, dtype=x.dtype, device=x.device)
        else:
            self.check_context(known, mask)
        b, n = x.shape[0], known.shape[0]
        if b % n:
            raise ValueError(f"the batch of {b} images is not a whole multiple of the {n} known images and masks")
        extra = self.extra_input(known.to(x.device, x.dtype), mask.to(x.device))  # (N, C + 1, H, W)
        return extra.repeat(b // n, 1, 1, 1) if b != n else extra  # (B, C + 1, H, W): [cond; uncond] tiles

    # -- running -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, known: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        extra = self._context_for(x, known, mask)  # (B, C + 1, H, W)
        tokens = self.known_embedder(extra.to(self.known_embedder.weight.dtype))  # (B, D, H/p, W/p)
        embedder = self.inner.x_embedder
        embedder.__dict__[_HOOK_FLAG] = tokens.flatten(2).transpose(1, 2)  # (B, T, D)
        try:
            return self.inner(x, t, y)  # (B, C_out, H, W): the backbone's own forward
        finally:
            embedder.__dict__[_HOOK_FLAG] = None

    # -- the model folder ----------------------------------------------------------------------
    def saved_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"known_embedder.{k}": v for k, v in self.known_embedder.state_dict().items()}
        table = {"version": TABLE_VERSION, "mask_convention": MASK_CONVENTION, "trained_masks": self.trained_masks}
        return tensors, table

    @classmethod
    def from_saved(cls, inner: nn.Module, tensors: dict[str, torch.Tensor], table: dict[str, Any]) -> "InpaintModel":
        from .infer import CheckpointError

        if table.get("version") != TABLE_VERSION or table.get("mask_convention") != MASK_CONVENTION:
            raise CheckpointError(f"the folder's inpainting table is not one this leandit reads ({table}); re-save the model")
        model = cls(inner, trained_masks=table.get("trained_masks"))
        expected = {f"known_embedder.{k}": v for k, v in model.known_embedder.state_dict().items()}
        wrong = sorted(set(expected) ^ set(tensors)) + sorted(
            k for k in set(expected) & set(tensors) if tuple(tensors[k].shape) != tuple(expected[k].shape))
        if wrong:
            raise CheckpointError(
                f"the inpainting weights do not fit this model ({', '.join(wrong[:3])} missing, unexpected or mis-shaped): "
                "the file belongs to another model or is damaged"
            )
        model.known_embedder.load_state_dict({k.removeprefix("known_embedder."): v for k, v in tensors.items()}, strict=True)
        return model

    def summary(self) -> dict[str, Any]:
        """What `leandit info` shows."""
        c = self.inner.config
        return {"method": "inpainting", "extra_channels": c.in_channels + 1, "mask_convention": MASK_CONVENTION,
                "trained_masks": self.trained_masks, "parameters": sum(p.numel() for p in self.known_embedder.parameters())}


class _BlocksToInner(dict):
    """The wrapper's `_modules`, except that a block list set on the wrapper is set on the
    backbone: `running_blocks(model, kept)` and wrappers that swap `model._modules["blocks"]`
    for a call then change what the backbone runs, and the wrapper never holds (or saves) a
    second reference to the blocks."""

    def __setitem__(self, key: str, value: Any) -> None:
        if key == "blocks" and "inner" in self:
            self["inner"]._modules["blocks"] = value
        else:
            super().__setitem__(key, value)


# What the wrapper answers with the backbone's own attributes.
_FROM_INNER = ("blocks", "source", "compression")
# The attribute of the backbone's patch embedding that holds the pending extra tokens.
_HOOK_FLAG = "_inpaint_tokens"


def _add_known_tokens(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of the backbone's patch embedding: image tokens + the known image's tokens.
    A plain function reading the module's own attribute, so a deep copy (the EMA) hooks its
    own copy, and the backbone alone (no pending tokens) runs as before."""
    extra = module.__dict__.get(_HOOK_FLAG)
    if extra is None:
        return output
    return output + extra.to(output.dtype)  # (B, T, D)


def inpaint_layer(model: nn.Module) -> InpaintModel | None:
    """The InpaintModel inside `model` (itself, under DDP / compile or other registered
    wrappers), or None for a model that is not an inpainting variant."""
    from ..backbones import unwrap
    from .wrappers import peel_wrappers

    for _, layer in peel_wrappers(unwrap(model))[1]:
        if isinstance(layer, InpaintModel):
            return layer
    return None


# -- masks ------------------------------------------------------------------------------------
# Every built-in kind is a box of unknown pixels (x0, y0, x1, y1: columns x0..x1-1, rows
# y0..y1-1); the name says which part is unknown ("left": the left half is generated from the
# right half). "random" is a rectangle of 1/4 to 3/4 of each side at a random place; "all" is
# the whole image (nothing known: plain generation, the model's behaviour without a mask).
MASK_KINDS = ("left", "right", "top", "bottom", "center", "random", "all")
MIXED = MASK_KINDS
SPEC_HELP = (f"{', '.join(MASK_KINDS)}, mixed (a random kind per image), a comma-separated list of kinds (one drawn per "
             "image), box:x0,y0,x1,y1 (pixels, x1/y1 exclusive) or a .npy/.png mask of the image size (nonzero/white = unknown)")


@dataclass(frozen=True)
class MaskSpec:
    """Which pixels are unknown, per image: a choice among kinds, one box, or a fixed mask.

    `draw(uniforms)` turns UNIFORMS numbers in [0, 1) per image (from a training step's
    `StepRandom`, or from per-image seeds when sampling) into masks (N, 1, S, S), 1 = unknown.
    Every spec consumes the same numbers, so the randomness after it does not depend on it."""

    text: str
    size: int
    kinds: tuple[str, ...] = ()
    box: tuple[int, int, int, int] | None = None
    fixed: torch.Tensor | None = field(default=None, compare=False)  # (S, S) in {0, 1}

    UNIFORMS: ClassVar[int] = 5  # the kind, then the random box's width, height, column, row

    def draw(self, uniforms: torch.Tensor) -> torch.Tensor:
        n, device, s = uniforms.shape[0], uniforms.device, self.size
        if self.fixed is not None:
            return self.fixed.to(device, torch.float32).expand(n, 1, s, s).clone()  # (N, 1, S, S)
        if self.box is not None:
            boxes = torch.tensor(self.box, device=device).expand(n, 4)  # (N, 4)
        else:
            table = torch.tensor([_kind_box(k, s) for k in self.kinds], device=device)  # (K, 4); "random" placeholder
            choice = (uniforms[:, 0] * len(self.kinds)).long().clamp(max=len(self.kinds) - 1)  # (N,)
            boxes = table[choice]  # (N, 4)
            random = torch.tensor([k == "random" for k in self.kinds], device=device)[choice]  # (N,)
            boxes = torch.where(random[:, None], _random_boxes(uniforms[:, 1:], s), boxes)  # (N, 4)
        cols = torch.arange(s, device=device)
        x0, y0, x1, y1 = (boxes[:, i, None] for i in range(4))  # each (N, 1)
        inside_x = (cols >= x0) & (cols < x1)  # (N, S)
        inside_y = (cols >= y0) & (cols < y1)  # (N, S)
        return (inside_y[:, :, None] & inside_x[:, None, :]).unsqueeze(1).float()  # (N, 1, S, S)


def _kind_box(kind: str, s: int) -> tuple[int, int, int, int]:
    h, q = s // 2, s // 4
    return {"left": (0, 0, h, s), "right": (h, 0, s, s), "top": (0, 0, s, h), "bottom": (0, h, s, s),
            "center": (q, q, s - q, s - q), "all": (0, 0, s, s), "random": (0, 0, 0, 0)}[kind]


def _random_boxes(u: torch.Tensor, s: int) -> torch.Tensor:
    """(N, 4) boxes from (N, 4) uniforms: sides of s/4 to 3s/4 (at least 1), anywhere inside."""
    low, span = max(1, s // 4), max(1, s // 4) * 2
    w = (low + (u[:, 0] * (span + 1)).long()).clamp(max=s)  # (N,)
    h = (low + (u[:, 1] * (span + 1)).long()).clamp(max=s)
    x0 = (u[:, 2] * (s - w + 1)).long()
    y0 = (u[:, 3] * (s - h + 1)).long()
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)


def parse_masks(text: str, size: int) -> MaskSpec:
    """The MaskSpec of a --inpaint value for images of size x size pixels (the model's input
    size: latent pixels for a latent model); a one-line ValueError names what is wrong."""
    text = str(text).strip()
    if text.startswith("box:"):
        try:
            box = tuple(int(v) for v in text[4:].split(","))
        except ValueError:
            box = ()
        if len(box) != 4:
            raise ValueError(f"--inpaint {text}: a box is box:x0,y0,x1,y1 in whole pixels")
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size):
            raise ValueError(f"--inpaint {text}: the box must satisfy 0 <= x0 < x1 <= {size} and 0 <= y0 < y1 <= {size} "
                             f"(the images are {size}x{size}; x1 and y1 are exclusive)")
        return MaskSpec(text, size, box=box)
    if text.lower().endswith((".npy", ".png")):
        return MaskSpec(text, size, fixed=_read_mask_file(Path(text), size))
    kinds = MIXED if text == "mixed" else tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in MASK_KINDS]
    if not kinds or unknown:
        raise ValueError(f"unknown mask spec --inpaint {text!r}: use {SPEC_HELP}")
    return MaskSpec(text, size, kinds=kinds)


def _read_mask_file(path: Path, size: int) -> torch.Tensor:
    if not path.is_file():
        raise ValueError(f"--inpaint {path}: no such mask file")
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            from PIL import Image

            with Image.open(path) as image:
                array = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    except (OSError, ValueError) as err:
        raise ValueError(f"--inpaint {path}: not a readable mask ({err})") from None
    array = np.squeeze(np.asarray(array, dtype=np.float32))
    if array.shape != (size, size):
        raise ValueError(f"--inpaint {path}: the mask is {'x'.join(map(str, array.shape)) or 'a scalar'}, but the model's "
                         f"images are {size}x{size}: pass a mask of that size")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
        raise ValueError(f"--inpaint {path}: mask values must be in [0, 1] (1 or white = unknown)")
    return torch.from_numpy((array > 0.5).astype(np.float32))  # (S, S)


def register() -> None:
    from .wrappers import WrapperType, register_wrapper

    register_wrapper(WrapperType(name="inpaint", cls=InpaintModel, inner=lambda w: w.inner,
                                 state=lambda w: w.saved_state(), build=InpaintModel.from_saved))


register()

__all__ = ["MASK_CONVENTION", "MASK_KINDS", "InpaintModel", "MaskSpec", "inpaint_layer", "parse_masks"]
