"""Recovery fine-tuning of a pruned model: its own diffusion loss, logits KD from a frozen
teacher, and (masked) RepKD on aligned hidden states, mixed with per-term weights.

    loss = kd_weight * KD + diffusion_weight * diffusion + beta(step) * RepKD

TinyFusion's mix is 0.9 * KD + 0.1 * diffusion + beta * masked RepKD (k = 2), beta = 1e-2
decaying linearly to 0. Student and teacher see the same x_t, t and labels, label dropout
included; the teacher runs without gradients (in bf16 on GPUs).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ...backbones import Conditioning, backbone, cond_to
from ...diffusion import StepRandom, make_objective
from ...models.blocks import capturing_block_outputs, depth_of, list_ranges
from ...train.denoising import DenoisingJob
from .losses import repkd_loss, repkd_weight

# Named loss mixes: (kd_weight, diffusion_weight, repkd_weight, repkd_k).
MIXES: dict[str, tuple[float, float, float, float | None]] = {
    "masked-kd": (0.9, 0.1, 1e-2, 2.0),
    "kd": (0.9, 0.1, 0.0, 2.0),
    "repkd": (0.9, 0.1, 1e-2, None),
    "plain": (0.0, 1.0, 0.0, 2.0),
}


@dataclass
class RecoverySettings:
    """The loss mix of recovery fine-tuning; the defaults are TinyFusion's masked KD.

    Args:
        kd_weight: weight of the logits-KD term (output MSE, plus the variance KL for
            learned-sigma models).
        diffusion_weight: weight of the model's own diffusion (or flow) loss.
        repkd_weight: RepKD weight at the first step; it decays linearly to 0 at the last.
        repkd_k: RepKD drops activations more than k standard deviations from their sample's
            mean (in teacher or student); None = plain RepKD, no mask.
        class_dropout: label-dropout probability; None = the student config's.
    """

    kd_weight: float = MIXES["masked-kd"][0]
    diffusion_weight: float = MIXES["masked-kd"][1]
    repkd_weight: float = MIXES["masked-kd"][2]
    repkd_k: float | None = MIXES["masked-kd"][3]
    class_dropout: float | None = None

    def __post_init__(self) -> None:
        for name in ("kd_weight", "diffusion_weight", "repkd_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):  # NaN would skip every step
                raise ValueError(f"--{name.replace('_', '-')} must be a number >= 0, got {value}")
        if self.kd_weight == self.diffusion_weight == self.repkd_weight == 0:
            raise ValueError("every loss weight is 0: nothing to train on")
        if self.repkd_k is not None and not (self.repkd_k > 0):  # NaN would mask everything
            raise ValueError(f"--repkd-k must be a positive number of standard deviations (or 'none'), got {self.repkd_k}")

    @classmethod
    def from_mix(cls, mix: str, **overrides: Any) -> "RecoverySettings":
        if mix not in MIXES:
            raise ValueError(f"unknown loss mix {mix!r}; choose one of {', '.join(MIXES)}")
        kd, diffusion, repkd, k = MIXES[mix]
        values = {"kd_weight": kd, "diffusion_weight": diffusion, "repkd_weight": repkd, "repkd_k": k}
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)

    @property
    def needs_teacher(self) -> bool:
        return self.kd_weight > 0 or self.repkd_weight > 0


def check_teacher(student: nn.Module, teacher: nn.Module, hidden_states: bool) -> None:
    """A teacher must take the same inputs and predict the same thing as the student (it may
    be another architecture: a leandit DiT teaching a diffusers DiT student, say)."""
    s, t = backbone(student).spec, backbone(teacher).spec
    fields = ["objective", "learn_sigma", "in_channels", "input_size"]
    if hidden_states:
        fields += ["hidden_size", "patch_size"]
    for field in fields:
        if getattr(s, field) != getattr(t, field):
            raise ValueError(
                f"the teacher's {field} is {getattr(t, field)!r} but the student's is {getattr(s, field)!r}: "
                "distil from the model the student was pruned from"
            )
    if s.objective == "masked":
        # MAR: KD compares the heads' outputs on one head diffusion; RepKD compares encoder
        # states over the buffer and the known tokens, decoder states over every position.
        config_fields = ["head_timesteps", "buffer_size"] + (["decoder_hidden_size"] if hidden_states else [])
        for field in config_fields:
            mine, theirs = getattr(s.objective_config, field), getattr(t.objective_config, field)
            if mine != theirs:
                raise ValueError(f"the teacher's {field} is {theirs!r} but the student's is {mine!r}: "
                                 "distil from the model the student was pruned from")
    if not s.conditioning.compatible(t.conditioning):
        raise ValueError(
            f"the teacher is conditioned on {t.conditioning.describe()} but the student on {s.conditioning.describe()}: "
            "distil from the model the student was pruned from"
        )


class RecoveryJob(DenoisingJob):
    """Fine-tune `student` on the settings' loss mix. `teacher` (frozen, not trained, not
    checkpointed) may be None when the mix needs none; `teacher_layers[j]` is the teacher
    block whose output student block j is aligned with (needed for RepKD)."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        settings: RecoverySettings,
        teacher_layers: Sequence[int] | None = None,
        teacher_dtype: torch.dtype | None = None,
        conditioning: Conditioning | None = None,
    ):
        super().__init__(student, make_objective(backbone(student).spec), settings.class_dropout, conditioning)
        self.settings = settings
        self.depth = depth_of(student)
        use_repkd = settings.repkd_weight > 0
        if settings.needs_teacher:
            if teacher is None:
                raise ValueError("KD and RepKD need a teacher model")
            check_teacher(student, teacher, use_repkd)
            backbone(teacher).prepare().requires_grad_(False).eval()
        if use_repkd:
            if teacher_layers is None or len(teacher_layers) != self.depth:
                raise ValueError(f"RepKD needs one teacher layer per student layer ({self.depth})")
            teacher_depth = depth_of(teacher)
            if any(not 0 <= i < teacher_depth for i in teacher_layers):
                raise ValueError(f"teacher layers {list(teacher_layers)} are not all blocks of the {teacher_depth}-block teacher")
            _check_same_lists(student, teacher, teacher_layers)
        self.teacher = teacher if settings.needs_teacher else None
        self.teacher_layers = list(teacher_layers) if use_repkd else None
        self.teacher_dtype = teacher_dtype
        self.teacher_depth = depth_of(teacher) if self.teacher is not None else None
        self.current_repkd_weight = settings.repkd_weight

    def setup(self, device: torch.device) -> None:
        self.module.to(device)
        if self.teacher is not None:
            self.teacher.to(device=device, dtype=self.teacher_dtype)

    def prepare_compile(self, backend: str) -> None:
        if self.teacher is not None:
            self.teacher.compile(backend=backend)  # in place: the same module, compiled calls

    # A method built on recovery (DyDiT, routing) names the settings of its own that a resume
    # must not change: {key: settings dict}, stored and checked with the recovery settings.
    method_name: str = "recovery"

    def method_state(self) -> dict[str, dict[str, Any]]:
        return {}

    def _recovery_state(self) -> dict[str, Any]:
        return {"settings": asdict(self.settings), "teacher_layers": self.teacher_layers, "teacher_depth": self.teacher_depth}

    def state_dict(self) -> dict[str, Any]:
        """What the run was started with: a resume must not silently change the loss."""
        return {**self._recovery_state(), **self.method_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        for key, mine in self.method_state().items():
            saved = state.get(key)
            if saved is not None and saved != mine:
                changed = [k for k in saved if saved[k] != mine.get(k)]
                raise ValueError(
                    f"cannot resume: the run in this folder was started with other {self.method_name} settings "
                    f"({', '.join(changed)}); use the same options or a new --out folder"
                )
        saved = {key: state.get(key) for key in ("settings", "teacher_layers", "teacher_depth")}
        if saved != self._recovery_state():
            changed = [k for k in saved["settings"] or {} if saved["settings"][k] != asdict(self.settings).get(k)]
            changed += [k for k in ("teacher_layers", "teacher_depth") if saved[k] != getattr(self, k)]
            raise ValueError(
                f"cannot resume: the run in this folder was started with other recovery settings ({', '.join(changed)}); "
                "use the same options or a new --out folder"
            )

    def on_step_start(self, step: int, total_steps: int) -> None:
        self.current_repkd_weight = repkd_weight(step, total_steps, self.settings.repkd_weight)

    def compute_loss(self, module: nn.Module, batch: Any, random: StepRandom) -> tuple[torch.Tensor, dict[str, Any]]:
        s = self.settings
        x0, t, noise, y = self.draw_inputs(batch, random)
        seen: dict[str, torch.Tensor] = {}

        def student_fn(x: torch.Tensor, model_t: torch.Tensor) -> torch.Tensor:
            seen["x"], seen["t"] = x, model_t  # the teacher gets exactly these
            return self.predict(module, x, model_t, y)

        use_repkd = self.teacher_layers is not None
        with _capture(self.module, range(self.depth), use_repkd) as student_hidden:
            terms = self.objective.training_losses(student_fn, x0, t, noise)
        diffusion = terms["loss"].mean()
        loss = s.diffusion_weight * diffusion
        logs: dict[str, Any] = {"diffusion": diffusion, "mse": terms["mse"].mean()}
        if self.teacher is None:
            return loss, logs

        with torch.no_grad(), _capture(self.teacher, self.teacher_layers or [], use_repkd) as teacher_hidden:
            # A keyword: MAR's inputs (MaskedTokens) take .to(device, dtype), a tensor either way.
            x = seen["x"].to(dtype=self.teacher_dtype) if self.teacher_dtype else seen["x"]
            teacher_y = cond_to(y, x.device, self.teacher_dtype) if self.teacher_dtype else y
            teacher_output = backbone(self.teacher).predict(x, seen["t"], teacher_y)
        kd = self.objective.distillation_losses(terms["model_output"], teacher_output, terms["xt"], t)
        loss = loss + s.kd_weight * kd["kd"].mean()
        logs.update({name: value.mean() for name, value in kd.items()})
        if use_repkd:
            students = [student_hidden[j] for j in range(self.depth)]
            teachers = [teacher_hidden[i] for i in self.teacher_layers]
            repkd, dropped = repkd_loss(students, teachers, s.repkd_k)
            loss = loss + self.current_repkd_weight * repkd
            logs.update(repkd=repkd, repkd_weight=self.current_repkd_weight, repkd_dropped=dropped)
        return loss, logs


def _check_same_lists(student: nn.Module, teacher: nn.Module, teacher_layers: Sequence[int]) -> None:
    """Every student block distils from a teacher block of the same list (MAR: encoder from
    encoder, decoder from decoder: the other list's states are other tokens)."""
    student_ranges, teacher_ranges = list_ranges(student), list_ranges(teacher)
    if len(student_ranges) == len(teacher_ranges) == 1:
        return

    def owner(ranges, index: int) -> str:
        return next(name for name, start, stop in ranges if start <= index < stop)

    for j, i in enumerate(teacher_layers):
        if owner(student_ranges, j) != owner(teacher_ranges, i):
            raise ValueError(
                f"student block {j} is one of its {owner(student_ranges, j)} but is aligned with teacher block {i}, one of "
                f"the teacher's {owner(teacher_ranges, i)}: align every block with a block of its own list"
            )


def _capture(model: nn.Module, indices, enabled: bool):
    return capturing_block_outputs(model, list(indices)) if enabled else contextlib.nullcontext({})
