"""Depth pruning: N:M schemes, learnable gates (TinyFusion), the paper's baselines, export."""

from .baselines import (
    RANDOM_PICKS,
    SCORE_METHODS,
    explicit,
    fluxlite_scores,
    oracle,
    oracle_kept,
    random_masks_losses,
    random_method,
    score_method,
    sensitivity_scores,
    shortgpt_scores,
)
from .calibration import CalibrationSet, block_inputs_outputs, calibration_loss, make_calibration_set
from .decision import PruningDecision, select_by_scores
from .export import export_pruned, pruned_model
from .gates import DepthGates, GatedModel
from .learnable import LearnablePruningJob, LearnableSettings
from .lora import add_lora, plain_state_dict
from .scheme import Group, Scheme, global_scheme, parse_scheme

METHODS = ("learnable", *SCORE_METHODS, "oracle", "random", "indices")

__all__ = [
    "METHODS",
    "RANDOM_PICKS",
    "SCORE_METHODS",
    "CalibrationSet",
    "DepthGates",
    "GatedModel",
    "Group",
    "LearnablePruningJob",
    "LearnableSettings",
    "PruningDecision",
    "Scheme",
    "add_lora",
    "block_inputs_outputs",
    "calibration_loss",
    "explicit",
    "export_pruned",
    "fluxlite_scores",
    "global_scheme",
    "make_calibration_set",
    "oracle",
    "oracle_kept",
    "parse_scheme",
    "plain_state_dict",
    "pruned_model",
    "random_masks_losses",
    "random_method",
    "score_method",
    "select_by_scores",
    "sensitivity_scores",
    "shortgpt_scores",
]
