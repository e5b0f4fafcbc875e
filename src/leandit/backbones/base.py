"""The backbone interface: what every method, job, analysis and measurement may ask of a model.

A `Backbone` is an adapter bound to one model. It answers, for any architecture:
- `spec`: the facts as data (objective and parameterisation, input shape, space,
  conditioning, width, depth) in a `BackboneSpec`;
- `block_lists()`: the ordered block list(s) depth and token methods act on;
- `predict(x_t, t, cond)`: the prediction tensor (N, C_out, H, W), whatever the model's own
  call convention and return type; `via=` routes the call through a wrapper of the model
  (DDP, depth gates) so that wrapper's forward runs;
- `set_depth(n)`: record a new depth in the model's config after blocks were removed;
- `prepare()`: make the model safe to train with leandit (which draws label dropout itself);
- `write_files(folder, ...)` / `read_files(folder, ...)`: the model folder.

Adapters are registered in `leandit.backbones` in a table keyed by the model class, so an
algorithm never writes `isinstance(model, DiT)` or reads `model.config.<field>`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import nn

from .conditioning import Cond, Conditioning

OBJECTIVES = ("diffusion", "flow", "masked")
SPACES = ("latent", "pixel")


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone is, as data.

    Args:
        family: the architecture family ("DiT", "diffusers DiT", "PixArt").
        name: a display name (a named size, a file name).
        depth: number of blocks (all block lists together).
        hidden_size, num_heads, patch_size: token width, attention heads, patch side.
        in_channels, out_channels, input_size: the input (C, H, W) with H = W = input_size,
            and the prediction's channels (2 x in_channels with a learned variance).
        objective: "diffusion" (epsilon prediction, DiT's 1000 linear-beta steps, learned
            sigma when out = 2 x in), "flow" (SiT's linear interpolant: velocity, continuous
            t in [0, 1], t = 1 at the data) or "masked" (MAR: masked tokens, each denoised by a
            head; `leandit.diffusion.masked`).
        space: "latent" (SD-VAE latents scaled by 0.18215) or "pixel" (images in [-1, 1]).
        guided_channels: prediction channels that guidance acts on (None = all in_channels).
        condition_dropout: the label (caption) dropout it was trained with, the default of
            training jobs on it.
        conditioning: what the model is conditioned on (class labels, text, nothing).
        objective_config: for objectives with settings of their own (MAR's mask ratio and
            head schedule), the model config that holds them.
    """

    family: str
    name: str
    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int
    in_channels: int
    out_channels: int
    input_size: int
    objective: str
    space: str
    guided_channels: int | None
    condition_dropout: float
    conditioning: Conditioning = field(compare=False)
    objective_config: Any = field(default=None, compare=False)

    @property
    def learn_sigma(self) -> bool:
        return self.out_channels == 2 * self.in_channels

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.input_size, self.input_size)

    @property
    def channels_to_guide(self) -> int:
        return self.guided_channels or self.in_channels

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k not in ("conditioning", "objective_config")}
        return {**data, "learn_sigma": self.learn_sigma, "conditioning": self.conditioning.to_dict()}


class Backbone(ABC):
    """The adapter of one architecture, bound to one model (cheap to make: make one per use).

    Subclasses set `model_type` (the folder's model_type) and `block_list_names`, implement
    `matches`, `spec`, `predict`, `set_depth`, `write_files` and `read_files`.
    """

    model_type: ClassVar[str] = ""
    block_list_names: ClassVar[tuple[str, ...]] = ("blocks",)
    # For blocks that return a tuple: which input each output element replaces (a gate mixes
    # each output with that input). None: the block returns one tensor replacing its first input.
    block_output_inputs: ClassVar[tuple[int | str, ...] | None] = None
    # Sub-modules of every block that are copies of an embedder shared by the whole model
    # (diffusers' DiT copies the time/class embedders into each block): not block weights,
    # so per-block methods (LoRA, width) leave them alone.
    block_shared_modules: tuple[str, ...] = ()
    # Block lists that must keep at least one block, with the reason (depth methods refuse a
    # decision that empties one).
    required_block_lists: ClassVar[dict[str, str]] = {}

    def __init__(self, model: nn.Module, outer: nn.Module | None = None):
        self.model = model
        # What a call of the model goes through: the model itself, or the registered
        # compression wrapper around it (DyDiT routers, routing) whose forward takes the
        # model's own arguments. `spec`, the blocks and the folder are the model's.
        self.outer = outer if outer is not None else model

    @classmethod
    @abstractmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether this adapter understands `model`."""

    @property
    @abstractmethod
    def spec(self) -> BackboneSpec:
        """The model's facts as data."""

    def block_lists(self) -> list[nn.ModuleList]:
        return [getattr(self.model, name) for name in self.block_list_names]

    @property
    def blocks(self) -> nn.ModuleList:
        """The single block list (architectures with several lists refuse)."""
        if len(self.block_list_names) != 1:
            raise ValueError(f"{self.spec.family} has {len(self.block_list_names)} block lists: say which one")
        return getattr(self.model, self.block_list_names[0])

    @abstractmethod
    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Cond, via: Callable | None = None, **kwargs: Any) -> torch.Tensor:
        """The prediction (N, C_out, H, W) for x_t (N, C, H, W), timesteps t (N,) and `cond`.

        `via` is what to call instead of the model itself (a DDP or gating wrapper that takes
        the model's own arguments); `kwargs` go to it (e.g. gate_noise)."""

    @abstractmethod
    def set_depth(self, depth: int) -> None:
        """Record in the model's config that it now has `depth` blocks."""

    def pruning_notes(self, kept: list[int]) -> list[str]:
        """What keeping only blocks `kept` changes beyond removing the others (for the record)."""
        return []

    def prepare(self) -> nn.Module:
        """Make the model safe to train with leandit; returns the model (with its wrappers)."""
        return self.outer

    def timestep_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """The model's embedding of the timesteps t (N,) alone, (N, hidden): what DyDiT's width
        routers read. Architectures without one refuse."""
        raise ValueError(
            f"{self.spec.family} exposes no timestep embedding to leandit, so its width cannot follow the timestep "
            "(DyDiT's width routers need one); use dynamic tokens only, or a leandit DiT/SiT (`leandit convert` makes one "
            "from a diffusers DiT)"
        )

    def check_timestep_embedding(self) -> None:
        """Refuse, with the reason, a model whose timestep embedding routers cannot read."""
        device = next(self.model.parameters()).device
        with torch.no_grad():
            self.timestep_embedding(self.example_inputs(1, device)[1])

    def example_inputs(self, batch: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> tuple:
        """(x, t, cond) of the right shapes and kinds, for counting and timing."""
        spec = self.spec
        x = torch.zeros(batch, *spec.input_shape, device=device, dtype=dtype)
        t = torch.zeros(batch, device=device) if spec.objective == "flow" else torch.zeros(batch, dtype=torch.long, device=device)
        return x, t, spec.conditioning.example(batch, device)

    def describe(self) -> dict[str, Any]:
        """The architecture for `leandit info --json` (the model's own config where it has one)."""
        return self.spec.to_dict()

    # -- the model folder ------------------------------------------------------------------
    @abstractmethod
    def write_files(self, folder: Path, meta: Mapping[str, Any]) -> None:
        """Write the model's config and weights into the (existing, empty) folder; `meta` is
        leandit's own metadata (info, wrappers) to store beside them."""

    @classmethod
    @abstractmethod
    def read_files(cls, folder: Path, meta: Mapping[str, Any], weights_file: Path) -> nn.Module:
        """Build the model of a folder this adapter wrote, with the weights of `weights_file`."""

    @classmethod
    def weights_files(cls, folder: Path) -> tuple[str, str]:
        """(model weights, EMA weights) file names inside a folder."""
        return ("model.safetensors", "ema.safetensors")


class OwnNetworkBackbone(Backbone):
    """The adapter of one of leandit's own networks (DiT/SiT, MAR): the folder's config.json
    holds the network's config dataclass under "config", model.safetensors its state dict.

    Subclasses set `config_class` and implement `from_state_dict(config, state_dict, source)`."""

    config_class: ClassVar[type]

    @classmethod
    @abstractmethod
    def from_state_dict(cls, config: Any, state_dict: Mapping[str, torch.Tensor], source: str) -> nn.Module:
        """The network of `config` adopting the tensors (strict)."""

    def describe(self) -> dict[str, Any]:
        return self.model.config.to_dict()

    def write_files(self, folder: Path, meta: Mapping[str, Any]) -> None:
        import json

        from ..models.io import save_tensors

        config = {"format": "leandit-model", "format_version": 1, "model_type": self.model_type,
                  "config": self.model.config.to_dict(), **meta}
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_tensors(self.model.state_dict(), folder / "model.safetensors")

    @classmethod
    def read_files(cls, folder: Path, meta: Mapping[str, Any], weights_file: Path) -> nn.Module:
        from ..models.infer import CheckpointError
        from ..models.io import read_safetensors

        try:
            config = cls.config_class.from_dict(meta["config"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{folder / 'config.json'}: bad config ({err})") from None
        return cls.from_state_dict(config, read_safetensors(weights_file), str(weights_file))


__all__ = ["OBJECTIVES", "SPACES", "Backbone", "BackboneSpec", "OwnNetworkBackbone"]
