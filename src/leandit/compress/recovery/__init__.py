"""Recovery after pruning: fine-tuning with logits KD, RepKD and masked RepKD (TinyFusion),
with the student-teacher layer alignment read from the compression history."""

from .alignment import ALIGNMENT_RULES, layer_origins, parse_teacher_layers, pruning_records, record_alignment, teacher_layers
from .job import MIXES, RecoveryJob, RecoverySettings, check_teacher
from .losses import hidden_state_loss, outlier_mask, repkd_loss, repkd_weight

__all__ = [
    "ALIGNMENT_RULES",
    "MIXES",
    "RecoveryJob",
    "RecoverySettings",
    "check_teacher",
    "hidden_state_loss",
    "layer_origins",
    "outlier_mask",
    "parse_teacher_layers",
    "pruning_records",
    "record_alignment",
    "repkd_loss",
    "repkd_weight",
    "teacher_layers",
]
