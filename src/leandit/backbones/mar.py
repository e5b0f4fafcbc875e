"""MAR as a backbone: two block lists, no single `model(x, t, y)` call, a generation loop of
its own.

What the interface asks and how MAR answers it:
- `block_lists()`: encoder blocks then decoder blocks; depth methods see them as one ordered
  list (encoder first) and `set_list_depths` records each list's new length.
- `predict(x, t, cond)`: x is a `MaskedTokens` (tokens, mask, head rows), t the head rows'
  timesteps (N, M); the prediction is the head's output (N, M, 2C). The objective
  (`leandit.diffusion.masked.MaskedDiffusion`) builds both, so jobs call it as they call a
  DiT's.
- `generate(...)`: the iterative unmasking loop (a DiT is sampled by the objective's sampler
  calling `predict`; MAR's loop calls the encoder/decoder and the head separately).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..models.mar import MAR
from ..models.mar_config import MARConfig
from .base import BackboneSpec, OwnNetworkBackbone
from .conditioning import ClassLabels, Cond

class MARBackbone(OwnNetworkBackbone):
    """`MAR.encoder_blocks` + `MAR.decoder_blocks`, each block called as `block(x)`."""

    model_type = "mar"
    config_class = MARConfig
    block_list_names = ("encoder_blocks", "decoder_blocks")
    # Removing every encoder block is fine (the decoder still attends over buffer and known tokens).
    required_block_lists = {
        "decoder_blocks": "without decoder blocks the unknown tokens never see the known tokens or the class "
        "(the mask token enters after the encoder), so each would be predicted from its position alone",
    }

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, MAR)

    @property
    def spec(self) -> BackboneSpec:
        c: MARConfig = self.model.config
        return BackboneSpec(
            family="MAR",
            name=c.name,
            depth=c.depth,
            hidden_size=c.hidden_size,
            num_heads=c.encoder_heads,
            patch_size=c.patch_size,
            in_channels=c.in_channels,
            out_channels=2 * c.in_channels,  # the head's epsilon and learned-variance values
            input_size=c.input_size,
            objective="masked",
            space=c.space,
            guided_channels=None,
            condition_dropout=c.class_dropout_prob,
            conditioning=ClassLabels(c.num_classes, c.num_classes),  # the fake latent is the null input
            objective_config=c,
        )

    def predict(self, x: Any, t: torch.Tensor, cond: Cond, via: Callable | None = None, **kwargs: Any) -> torch.Tensor:
        return (self.outer if via is None else via)(x, t, cond, **kwargs)  # (N, M, 2C)

    def set_depth(self, depth: int) -> None:
        raise ValueError("MAR has two block lists (encoder, decoder): record each list's length with set_list_depths")

    def set_list_depths(self, depths: Sequence[int]) -> None:
        encoder, decoder = depths
        self.model.config = self.model.config.replace(encoder_depth=int(encoder), decoder_depth=int(decoder))

    def pruning_notes(self, kept: list[int]) -> list[str]:
        encoder = self.model.config.encoder_depth
        enc = [i for i in kept if i < encoder]
        dec = [i - encoder for i in kept if i >= encoder]
        return [f"kept encoder blocks {enc} and decoder blocks {dec} (of {encoder} + {self.model.config.decoder_depth})"]

    def example_inputs(self, batch: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> tuple:
        """A typical training call: the median mask ratio, each unknown token once."""
        from ..diffusion.masked import MaskedDiffusion

        c = self.model.config
        x0 = torch.zeros(batch, *self.spec.input_shape)
        inputs, steps, _ = MaskedDiffusion.for_config(c).calibration_inputs(x0, seed=0)
        return inputs.to(device, dtype), steps.to(device), self.spec.conditioning.example(batch, device)

    def generate(self, labels: torch.Tensor, noise: Any, **options: Any) -> torch.Tensor:
        """Images (N, C, H, W) in the model's space by MAR's loop (see `MaskedDiffusion.generate`)."""
        from ..diffusion.masked import MaskedDiffusion

        objective = MaskedDiffusion.for_config(self.model.config)
        return objective.generate(self.model, labels, noise, null_label=self.model.null_class, **options)

    @classmethod
    def from_state_dict(cls, config: MARConfig, state_dict: Mapping[str, torch.Tensor], source: str) -> nn.Module:
        return mar_from_state_dict(config, state_dict, source)


def mar_from_state_dict(config: MARConfig, state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> MAR:
    """Build MAR on the meta device and adopt the tensors (shared, not copied); strict."""
    from ..models.infer import check_keys

    with torch.device("meta"):
        model = MAR(config)
    check_keys(model.state_dict(), state_dict, source)
    model.load_state_dict(dict(state_dict), strict=True, assign=True)
    return model


__all__ = ["MARBackbone", "mar_from_state_dict"]
