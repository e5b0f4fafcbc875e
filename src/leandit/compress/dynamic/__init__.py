"""DyDiT (Zhao et al., ICLR 2025): timestep-wise dynamic width (TDW) and spatial-wise dynamic
tokens (SDT) on a pretrained diffusion transformer, fine-tuned toward a MAC target, with
inference that really skips the work (sliced weights per timestep, gathered tokens)."""

from ...models.wrappers import WrapperType, register_wrapper
from .block import DynamicBlock
from .macs import MacCounter
from ...models.dit import DiTBlock
from .model import DYNAMIC_BLOCKS, DynamicModel, DynamicSettings, default_timesteps, register_dynamic_block
from .saving import build_saved, saved_state

register_dynamic_block(DiTBlock, DynamicBlock)
from . import diffusers_blocks  # noqa: E402,F401  diffusers' DiT/PixArt blocks (imports diffusers only when one exists)
register_wrapper(WrapperType(name="dydit", cls=DynamicModel, inner=lambda w: w.backbone, state=saved_state, build=build_saved))

__all__ = ["DYNAMIC_BLOCKS", "register_dynamic_block", "DynamicBlock", "DynamicModel", "DynamicSettings", "MacCounter", "default_timesteps"]
