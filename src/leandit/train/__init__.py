"""The one training loop and the jobs it runs."""

from .denoising import DenoisingJob, drop_labels
from .distributed import DistEnv, setup_distributed, teardown_distributed
from .ema import EMA
from .loop import LoopConfig, Trainer, TrainingJob, TrainResult
from .schedules import linear_anneal, lr_factor

__all__ = [
    "DenoisingJob",
    "DistEnv",
    "EMA",
    "LoopConfig",
    "TrainResult",
    "Trainer",
    "TrainingJob",
    "drop_labels",
    "linear_anneal",
    "lr_factor",
    "setup_distributed",
    "teardown_distributed",
]
