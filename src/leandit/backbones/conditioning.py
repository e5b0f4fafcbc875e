"""What a backbone is conditioned on, and the few operations every method needs on it.

A conditioning value travels through data sets, training steps, guidance and sampling as:
- class labels: a LongTensor (N,) of class ids; the null class (classifier-free guidance,
  label dropout) is id `num_classes`;
- text: a dict {"text": (N, L, D) float embeddings, "text_mask": (N, L) 1 = real token}, as
  a pipeline's text encoder produced them; the null input is the empty prompt's embedding,
  which comes with the data (a captioned data set or a prompt-embedding file), not the model;
- nothing: None.

Methods never look inside: they index, concatenate, move and drop through the functions
below, so a new kind of conditioning is one class here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Union

import torch

Cond = Union[torch.Tensor, Mapping[str, torch.Tensor], None]


def cond_map(cond: Cond, fn) -> Cond:
    """Apply fn to every tensor of a conditioning value."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return fn(cond)
    return {key: fn(value) for key, value in cond.items()}


def cond_slice(cond: Cond, index) -> Cond:
    """Rows `index` (a slice, an index tensor or a boolean mask) of a batched value."""
    return cond_map(cond, lambda v: v[index])


def cond_cat(parts: list[Cond]) -> Cond:
    """Batched values concatenated along the batch."""
    first = parts[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    return {key: torch.cat([p[key] for p in parts]) for key in first}


def cond_to(cond: Cond, device: torch.device | str, dtype: torch.dtype | None = None) -> Cond:
    """Moved to `device`; floating tensors also cast to `dtype` when given (ids and masks never)."""

    def move(v: torch.Tensor) -> torch.Tensor:
        if dtype is not None and v.is_floating_point():
            return v.to(device=device, dtype=dtype)
        return v.to(device)

    return cond_map(cond, move)


def cond_batch_size(cond: Cond) -> int | None:
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond.shape[0]
    return next(iter(cond.values())).shape[0]


def cond_repeat(cond: Cond, n: int) -> Cond:
    """A batch of one value (its tensors without the batch dimension) repeated n times."""
    return cond_map(cond, lambda v: v.unsqueeze(0).expand(n, *v.shape).clone())


def cond_where(keep: torch.Tensor, cond: Cond, other: Cond) -> Cond:
    """Row i of `cond` where keep[i], else row i of `other` (same batch)."""
    if cond is None:
        return None

    def pick(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        k = keep.reshape(-1, *([1] * (a.dim() - 1)))
        return torch.where(k, a, b.to(a.dtype))

    if isinstance(cond, torch.Tensor):
        return pick(cond, other)
    return {key: pick(cond[key], other[key]) for key in cond}


class Conditioning:
    """What a backbone is conditioned on. `kind` is "class", "text" or "none"."""

    kind = "none"

    @property
    def has_null(self) -> bool:
        """Whether an unconditional input exists (needed by label dropout and guidance)."""
        return False

    def null(self, batch: int, device: torch.device | str = "cpu") -> Cond:
        """The unconditional input for `batch` samples."""
        raise ValueError(f"{self.describe()}: has no unconditional input, so it cannot use classifier-free guidance or label dropout")

    def drop(self, cond: Cond, dropped: torch.Tensor) -> Cond:
        """`cond` with rows `dropped` (a boolean (N,) mask) replaced by the null input (always
        a select, never "if any was dropped": that would make a GPU wait for the draw)."""
        return cond_where(~dropped, cond, self.null(dropped.shape[0], dropped.device))

    def example(self, batch: int, device: torch.device | str = "cpu") -> Cond:
        """A valid input for `batch` samples (for FLOP counts and speed measurements)."""
        return None

    def compatible(self, other: "Conditioning") -> bool:
        """Whether a model conditioned by `other` takes the same inputs (student and teacher)."""
        return type(self) is type(other)

    def describe(self) -> str:
        return "unconditional"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}


@dataclass
class ClassLabels(Conditioning):
    """Class ids 0..num_classes-1; `null_class` (= num_classes when the label table has its
    extra row) is the unconditional input, None when the model was trained without one."""

    num_classes: int
    null_class: int | None = None
    kind = "class"

    @property
    def has_null(self) -> bool:
        return self.null_class is not None

    def null(self, batch: int, device: torch.device | str = "cpu") -> Cond:
        if self.null_class is None:
            raise ValueError(
                "this model has no null class (it was trained without label dropout): it cannot use "
                "classifier-free guidance (use --cfg-scale 1) or label dropout (use --class-dropout 0)"
            )
        return torch.full((batch,), self.null_class, dtype=torch.long, device=device)

    def example(self, batch: int, device: torch.device | str = "cpu") -> Cond:
        return torch.zeros(batch, dtype=torch.long, device=device)

    def compatible(self, other: Conditioning) -> bool:
        return isinstance(other, ClassLabels) and (self.num_classes, self.has_null) == (other.num_classes, other.has_null)

    def describe(self) -> str:
        return f"{self.num_classes} classes" + (" + null class" if self.has_null else "")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_classes": self.num_classes, "null_class": self.null_class}


@dataclass
class TextEmbeddings(Conditioning):
    """Text-encoder embeddings of width `dim` (T5-XXL: 4096) with an attention mask.

    `null_text` / `null_mask` ((L, D), (L,)): the empty prompt's embedding, the unconditional
    input. A model does not know it (it depends on the text encoder and its padding length):
    it is attached from the data or a prompt file with `with_null`.
    """

    dim: int
    null_text: torch.Tensor | None = field(default=None, repr=False, compare=False)
    null_mask: torch.Tensor | None = field(default=None, repr=False, compare=False)
    kind = "text"

    @property
    def has_null(self) -> bool:
        return self.null_text is not None

    def with_null(self, null: Mapping[str, torch.Tensor]) -> "TextEmbeddings":
        """This conditioning with the empty prompt's embedding {"text": (L, D), "text_mask": (L,)}."""
        text, mask = null["text"], null["text_mask"]
        if text.dim() != 2 or text.shape[-1] != self.dim:
            raise ValueError(f"the empty-prompt embedding has shape {tuple(text.shape)}, the model takes (L, {self.dim}) text embeddings")
        return TextEmbeddings(self.dim, text, mask)

    def null(self, batch: int, device: torch.device | str = "cpu") -> Cond:
        if self.null_text is None:
            raise ValueError(
                "no empty-prompt embedding is known for this text-conditioned model: classifier-free guidance and "
                "label dropout need one (captioned data from 'leandit extract-features --pipeline' or a prompt file "
                "from 'leandit encode-prompts' carries it)"
            )
        return cond_to(cond_repeat({"text": self.null_text, "text_mask": self.null_mask}, batch), device)

    def example(self, batch: int, device: torch.device | str = "cpu", length: int = 120) -> Cond:
        return {"text": torch.zeros(batch, length, self.dim, device=device),
                "text_mask": torch.ones(batch, length, dtype=torch.long, device=device)}

    def compatible(self, other: Conditioning) -> bool:
        return isinstance(other, TextEmbeddings) and self.dim == other.dim

    def describe(self) -> str:
        return f"text embeddings of width {self.dim}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "dim": self.dim}


__all__ = [
    "ClassLabels",
    "Cond",
    "Conditioning",
    "TextEmbeddings",
    "cond_batch_size",
    "cond_cat",
    "cond_map",
    "cond_repeat",
    "cond_slice",
    "cond_to",
    "cond_where",
]
