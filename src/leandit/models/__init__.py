"""Backbones (DiT; SiT is the same network), their named configs, and the one load/save path."""

from .config import NAMED_CONFIGS, DiTConfig, named_config
from .dit import DiT, DiTBlock
from .infer import CheckpointError, infer_dit_config
from .guidance import classifier_free_guidance
from .io import build_model, load_model, model_from_state_dict, save_model

__all__ = [
    "NAMED_CONFIGS",
    "CheckpointError",
    "DiT",
    "DiTBlock",
    "DiTConfig",
    "build_model",
    "infer_dit_config",
    "classifier_free_guidance",
    "load_model",
    "model_from_state_dict",
    "named_config",
    "save_model",
]
