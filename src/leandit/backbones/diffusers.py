"""diffusers transformers as backbones: `DiTTransformer2DModel` (class labels) and
`PixArtTransformer2DModel` (T5 text embeddings).

What differs between diffusers architectures is declared as data (`LAYOUTS`): the block
lists, the config fields holding their lengths, the kind of conditioning and the config field
of its width. One adapter class reads the layout, so another diffusers transformer of the
same shape (SD3, Flux, Sana) is a row here plus what is truly new about it.

A diffusers folder written by leandit is exactly what `save_pretrained` writes (`config.json`
+ `diffusion_pytorch_model.safetensors`, so stock `from_pretrained` reads it), plus leandit's
own files beside it: `leandit.json` (objective, space, guidance channels, wrappers),
`compression.json` and `ema.safetensors`. leandit's facts about the model that diffusers'
config does not hold live in `model.leandit_info` (a dict; defaults below when absent).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .base import OBJECTIVES, SPACES, Backbone, BackboneSpec
from .conditioning import ClassLabels, Cond, TextEmbeddings

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
LEANDIT_META = "leandit.json"
# What leandit assumes of a diffusers transformer without leandit.json: both families were
# trained as DiT was (epsilon, learned sigma, 1000 linear-beta steps) on SD-VAE latents.
DEFAULT_INFO = {"objective": "diffusion", "space": "latent", "guided_channels": None, "name": ""}


@dataclass(frozen=True)
class DiffusersLayout:
    """The facts of one diffusers transformer class.

    Args:
        family: display name of the architecture.
        conditioning: "class" (class_labels; the label table has a null row) or "text"
            (encoder_hidden_states + encoder_attention_mask).
        condition_width: the config field giving the number of classes or the text width.
        block_lists: attributes holding the blocks, in the order they run.
        depth_fields: the config field recording each list's length.
        block_shared: sub-modules of each block that copy a model-wide embedder.
        timestep_embedder: the module (a path from the model) whose `time_proj` and
            `timestep_embedder` embed the timestep alone (what DyDiT's width routers read).
    """

    family: str
    conditioning: str
    condition_width: str
    block_lists: tuple[str, ...] = ("transformer_blocks",)
    depth_fields: tuple[str, ...] = ("num_layers",)
    block_shared: tuple[str, ...] = ()
    timestep_embedder: str = ""


LAYOUTS: dict[str, DiffusersLayout] = {
    # Each block holds a copy of the time and class embedders; the output head reads block 0's.
    "DiTTransformer2DModel": DiffusersLayout("diffusers DiT", "class", "num_embeds_ada_norm", block_shared=("norm1.emb",),
                                             timestep_embedder="transformer_blocks.0.norm1.emb"),
    "PixArtTransformer2DModel": DiffusersLayout("PixArt", "text", "caption_channels", timestep_embedder="adaln_single.emb"),
}


def leandit_info(model: nn.Module) -> dict[str, Any]:
    return {**DEFAULT_INFO, **(getattr(model, "leandit_info", None) or {})}


def check_info(info: Mapping[str, Any], where: str) -> None:
    if info.get("objective") not in OBJECTIVES:
        raise ValueError(f"{where}: objective must be one of {OBJECTIVES}, got {info.get('objective')!r}")
    if info.get("space") not in SPACES:
        raise ValueError(f"{where}: space must be one of {SPACES}, got {info.get('space')!r}")


class DiffusersBackbone(Backbone):
    """A diffusers transformer of a class in `LAYOUTS`."""

    model_type = "diffusers"

    def __init__(self, model: nn.Module, outer: nn.Module | None = None):
        super().__init__(model, outer)
        self.layout = LAYOUTS[type(model).__name__]
        self.block_list_names = self.layout.block_lists
        self.block_shared_modules = self.layout.block_shared

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ in LAYOUTS and type(model).__module__.startswith("diffusers.")

    @property
    def spec(self) -> BackboneSpec:
        c = self.model.config
        info = leandit_info(self.model)
        width = c[self.layout.condition_width]
        if self.layout.conditioning == "class":
            # diffusers' label embedder always has the extra null row (dropout 0.1 built in).
            conditioning = ClassLabels(int(width), int(width))
        else:
            conditioning = TextEmbeddings(int(width))
        return BackboneSpec(
            family=self.layout.family,
            name=info.get("name") or "",
            depth=sum(len(blocks) for blocks in self.block_lists()),
            hidden_size=c.num_attention_heads * c.attention_head_dim,
            num_heads=c.num_attention_heads,
            patch_size=c.patch_size,
            in_channels=c.in_channels,
            out_channels=c.out_channels or c.in_channels,
            input_size=c.sample_size,
            objective=info["objective"],
            space=info["space"],
            guided_channels=info.get("guided_channels"),
            condition_dropout=float(info.get("condition_dropout", 0.1)),  # both families' training value
            conditioning=conditioning,
        )

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Cond, via: Callable | None = None, **kwargs: Any) -> torch.Tensor:
        call = self.outer if via is None else via
        if self.layout.conditioning == "class":
            out = call(hidden_states=x, timestep=t, class_labels=cond, return_dict=False, **kwargs)
        else:
            out = call(
                hidden_states=x,
                encoder_hidden_states=cond["text"].to(x.dtype),  # (N, L, D_text)
                encoder_attention_mask=cond["text_mask"],  # (N, L)
                timestep=t,
                added_cond_kwargs=self._size_conditions(x),
                return_dict=False,
                **kwargs,
            )
        return out[0]  # (N, C_out, H, W)

    def _size_conditions(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """PixArt at 1024 px also embeds the image size and aspect ratio (in pixels, as the
        pipeline computes them from the latent size and the VAE's factor 8)."""
        if not getattr(self.model, "use_additional_conditions", False):
            return {"resolution": None, "aspect_ratio": None}
        n, _, h, w = x.shape
        resolution = torch.tensor([h * 8, w * 8], dtype=x.dtype, device=x.device).repeat(n, 1)
        aspect = torch.tensor([h / w], dtype=x.dtype, device=x.device).repeat(n, 1)
        return {"resolution": resolution, "aspect_ratio": aspect}

    def timestep_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep part of the model's conditioning, (N, hidden): DiT's time embedder
        without the class embedding (block 0's copy, the one the output head reads); PixArt's
        adaLN-single embedding of t (`embedded_timestep` without the size conditions, before
        the 6 x hidden projection)."""
        if not self.layout.timestep_embedder:
            return super().timestep_embedding(t)
        emb = self.model.get_submodule(self.layout.timestep_embedder)
        dtype = emb.timestep_embedder.linear_1.weight.dtype  # the model's hidden dtype
        return emb.timestep_embedder(emb.time_proj(t).to(dtype=dtype))  # (N, D)

    def set_depth(self, depth: int) -> None:
        if len(self.layout.depth_fields) != 1:
            raise ValueError(f"{self.layout.family} has several block lists: set each list's length")
        self.model.register_to_config(**{self.layout.depth_fields[0]: depth})

    def pruning_notes(self, kept: list[int]) -> list[str]:
        # diffusers' DiT head reads block 0's embedder copy: without block 0 it reads the first
        # kept block's, which equals it in converted checkpoints but may have drifted in
        # training (each copy is trained only through its own block).
        if not self.block_shared_modules or not kept or kept[0] == 0:
            return []
        blocks = self.blocks
        notes = []
        for name in self.block_shared_modules:
            old, new = blocks[0].get_submodule(name).state_dict(), blocks[kept[0]].get_submodule(name).state_dict()
            differ = max(float((old[k].float() - new[k].float()).abs().max()) for k in old)
            if differ > 0:
                notes.append(f"block 0 was removed: the output head now reads block {kept[0]}'s copy of {name}, "
                             f"which differs from block 0's by up to {differ:.3g}")
        return notes

    def prepare(self) -> nn.Module:
        # diffusers' label embedders drop labels themselves in training mode (independently in
        # every block's copy); leandit drops them once per image in the objective, identically
        # for a student and its teacher, so the embedders' own dropout is switched off.
        from diffusers.models.embeddings import LabelEmbedding

        for module in self.model.modules():
            if isinstance(module, LabelEmbedding):
                module.dropout_prob = 0.0
        return self.outer

    def describe(self) -> dict[str, Any]:
        return {"_class_name": type(self.model).__name__, **dict(self.model.config), "leandit": leandit_info(self.model)}

    # -- the model folder ------------------------------------------------------------------
    def write_files(self, folder: Path, meta: Mapping[str, Any]) -> None:
        self.model.save_pretrained(str(folder), safe_serialization=True)
        record = {"format": "leandit-model", "format_version": 1, "model_type": self.model_type,
                  "class_name": type(self.model).__name__, "backbone": leandit_info(self.model), **meta}
        (folder / LEANDIT_META).write_text(json.dumps(record, indent=2) + "\n")

    @classmethod
    def read_files(cls, folder: Path, meta: Mapping[str, Any], weights_file: Path) -> nn.Module:
        from ..models.infer import CheckpointError
        from ..models.io import read_weights

        class_name = meta.get("class_name")
        if class_name not in LAYOUTS:
            raise CheckpointError(
                f"{folder}: a diffusers {class_name or 'model'}, which leandit cannot adapt yet; "
                f"supported: {', '.join(LAYOUTS)}"
            )
        import diffusers
        from accelerate import init_empty_weights

        model_class = getattr(diffusers, class_name)
        try:
            config = model_class.load_config(str(folder))
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{folder / 'config.json'}: not a readable diffusers config ({str(err).splitlines()[0]})") from None
        # Parameters on the meta device (no memory, no init), buffers computed for real: the
        # fixed position embeddings of these models are buffers that are not saved.
        with init_empty_weights(include_buffers=False):
            model = model_class.from_config(config)
        state_dict = read_weights(weights_file)
        _load_strictly(model, state_dict, str(weights_file))
        info = {**DEFAULT_INFO, **(meta.get("backbone") or {})}
        check_info(info, str(folder / LEANDIT_META))
        model.leandit_info = info
        return model

    @classmethod
    def weights_files(cls, folder: Path) -> tuple[str, str]:
        # As `save_pretrained` writes them: one file, the index of a sharded one (large
        # models), or the older pickle format.
        for name in (DIFFUSERS_WEIGHTS, DIFFUSERS_WEIGHTS + ".index.json", "diffusion_pytorch_model.bin"):
            if (folder / name).exists():
                return (name, "ema.safetensors")
        return (DIFFUSERS_WEIGHTS, "ema.safetensors")


def _load_strictly(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    from ..models.infer import check_keys

    expected = model.state_dict()
    check_keys(expected, state_dict, source)
    model.load_state_dict(dict(state_dict), strict=True, assign=True)
    # Checkpoints in float16/bfloat16 come back in their dtype; floating buffers follow the weights.


__all__ = ["DIFFUSERS_WEIGHTS", "LAYOUTS", "LEANDIT_META", "DiffusersBackbone", "DiffusersLayout", "leandit_info"]
