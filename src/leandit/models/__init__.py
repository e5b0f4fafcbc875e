"""Backbones (DiT, SiT = the same network, and MAR), their named configs, and the one load/save path."""

from .config import NAMED_CONFIGS, DiTConfig, named_config
from .dit import DiT, DiTBlock
from .infer import CheckpointError, infer_dit_config
from .guidance import classifier_free_guidance
from .mar import MAR
from .mar_config import MAR_SIZES, MARConfig, named_mar_config

_IO = ("build_model", "load_model", "model_from_state_dict", "save_model")


def __getattr__(name: str):
    # models.io imports leandit.backbones, whose DiT adapter imports models.config: loading io
    # on first use lets either package be imported first (and keeps `leandit --help` light).
    if name in _IO:
        from . import io

        return getattr(io, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "NAMED_CONFIGS",
    "CheckpointError",
    "DiT",
    "DiTBlock",
    "DiTConfig",
    "MAR",
    "MARConfig",
    "MAR_SIZES",
    "build_model",
    "infer_dit_config",
    "classifier_free_guidance",
    "load_model",
    "model_from_state_dict",
    "named_config",
    "named_mar_config",
    "save_model",
]
