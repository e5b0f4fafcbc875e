"""leandit's own DiT (SiT is the same network with the flow objective): the first adapter."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..models.config import DiTConfig
from ..models.dit import DiT
from .base import BackboneSpec, OwnNetworkBackbone
from .conditioning import ClassLabels, Cond

class DiTBackbone(OwnNetworkBackbone):
    """`DiT.blocks` run as `block(x, c)`; `model(x, t, y)` returns the prediction tensor."""

    model_type = "dit"
    config_class = DiTConfig
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
        return (self.outer if via is None else via)(x, t, cond, **kwargs)  # (N, C_out, H, W)

    def timestep_embedding(self, t: torch.Tensor) -> torch.Tensor:
        return self.model.t_embedder(t)  # (N, D)

    def set_depth(self, depth: int) -> None:
        self.model.config = self.model.config.replace(depth=depth)

    @classmethod
    def from_state_dict(cls, config: DiTConfig, state_dict: Mapping[str, torch.Tensor], source: str) -> nn.Module:
        from ..models.io import model_from_state_dict

        return model_from_state_dict(config, state_dict, source=source)
