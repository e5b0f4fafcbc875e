"""leandit's own DiT (SiT is the same network with the flow objective): the first adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors.torch import load_file
from torch import nn

from ..models.config import DiTConfig
from ..models.dit import DiT
from .base import Backbone, BackboneSpec
from .conditioning import ClassLabels, Cond

LEANDIT_FORMAT = "leandit-model"


class DiTBackbone(Backbone):
    """`DiT.blocks` run as `block(x, c)`; `model(x, t, y)` returns the prediction tensor."""

    model_type = "dit"
    block_list_names = ("blocks",)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, DiT)

    @property
    def spec(self) -> BackboneSpec:
        c: DiTConfig = self.model.config
        return BackboneSpec(
            family="DiT",
            name=c.name,
            depth=c.depth,
            hidden_size=c.hidden_size,
            num_heads=c.num_heads,
            patch_size=c.patch_size,
            in_channels=c.in_channels,
            out_channels=c.out_channels,
            input_size=c.input_size,
            objective=c.objective,
            space=c.space,
            guided_channels=c.guided_channels,
            condition_dropout=c.class_dropout_prob,
            conditioning=ClassLabels(c.num_classes, c.num_classes if c.has_null_class else None),
        )

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Cond, via: Callable | None = None, **kwargs: Any) -> torch.Tensor:
        return (via or self.outer)(x, t, cond, **kwargs)  # (N, C_out, H, W)

    def timestep_embedding(self, t: torch.Tensor) -> torch.Tensor:
        return self.model.t_embedder(t)  # (N, D)

    def set_depth(self, depth: int) -> None:
        self.model.config = self.model.config.replace(depth=depth)

    def describe(self) -> dict[str, Any]:
        return self.model.config.to_dict()

    def write_files(self, folder: Path, meta: Mapping[str, Any]) -> None:
        from ..models.io import save_tensors

        config = {"format": LEANDIT_FORMAT, "format_version": 1, "model_type": self.model_type,
                  "config": self.model.config.to_dict(), **meta}
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_tensors(self.model.state_dict(), folder / "model.safetensors")

    @classmethod
    def read_files(cls, folder: Path, meta: Mapping[str, Any], weights_file: Path) -> nn.Module:
        from ..models.infer import CheckpointError
        from ..models.io import model_from_state_dict, read_safetensors

        try:
            config = DiTConfig.from_dict(meta["config"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{folder / 'config.json'}: bad config ({err})") from None
        return model_from_state_dict(config, read_safetensors(weights_file), source=str(weights_file))
