"""leandit: make pretrained diffusion transformers cheaper to run and keep their quality."""

from .models import DiT, DiTConfig, build_model, load_model, save_model

__version__ = "0.1.0"

__all__ = ["DiT", "DiTConfig", "build_model", "load_model", "save_model", "__version__"]
