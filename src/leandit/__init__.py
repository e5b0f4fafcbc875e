"""leandit: make pretrained diffusion transformers cheaper to run and keep their quality."""

__version__ = "0.1.0"

__all__ = ["DiT", "DiTConfig", "build_model", "load_model", "save_model", "__version__"]


def __getattr__(name: str):
    # The models (and torch) load on first use, so that `leandit --help` starts at once.
    if name in ("DiT", "DiTConfig", "build_model", "load_model", "save_model"):
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'leandit' has no attribute {name!r}")
