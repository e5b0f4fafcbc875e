"""TinyFusion: learn which blocks to keep, with a weight update that estimates recoverability.

The job trains `DepthGates` logits (one categorical distribution per N:M group, sampled per
image with the straight-through Gumbel-softmax) together with LoRA adapters, all the weights,
or nothing else, on the model's own diffusion loss. The temperature anneals linearly; the
loop keeps an EMA of everything including the logits, and the decision is the most likely
candidate of every group under the EMA logits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ...backbones import Conditioning, backbone
from ...diffusion import StepRandom, make_objective
from ...train.denoising import draw_inputs, job_conditioning
from ...train.ema import ema_decay_for_steps
from ...train.loop import TrainingJob
from ...train.schedules import linear_anneal
from ...models.blocks import depth_of
from .decision import PruningDecision, group_records
from .gates import DepthGates, GatedModel
from .lists import check_scheme_lists
from .lora import add_lora
from .scheme import Scheme, mask_to_indices, parse_scheme

RECOVERABILITY = ("lora", "full", "frozen")
SKIP_DROPPED = ("auto", "on", "off")


def auto_ema_decay(steps: int) -> float:
    """The EMA decay of `--ema-decay auto` for mask learning: the paper's 0.999 at its ~10k
    steps; see `train.ema.ema_decay_for_steps`."""
    return ema_decay_for_steps(steps, maximum=0.999)


@dataclass
class LearnableSettings:
    """Hyperparameters of learnable depth pruning; the defaults are the paper's.

    Args:
        scheme: N:M groups, e.g. "1:2", "2:4" or mixed "1:2,2:4,1:2".
        temperature_start, temperature_end: Gumbel-softmax temperature, linear per step.
        logit_scale: multiplier of the logits before the softmax.
        logit_init: the starting value of every logit (uniform distribution).
        logits_lr: learning rate of the logits (weights use the loop's lr, 1e-4).
        recoverability: "lora" (adapters on every Linear of the blocks), "full" (all
            weights train) or "frozen" (only the gates).
        lora_rank, lora_alpha: LoRA size and scale (alpha / rank multiplies the update).
        class_dropout: label-dropout probability; None = the model config's.
        skip_dropped_backward: "on" runs each block's forward for the images whose gate is
            0 without a graph (the backward then runs over the kept images only: the same
            gradients, less work); "auto" = on for CPUs, where it was measured faster, off
            for GPUs, where the per-block split was measured 1.2-1.6x slower on an H100
            (small launches) though a quarter lighter in memory, and off with --compile.
    """

    scheme: str = "1:2"
    temperature_start: float = 4.0
    temperature_end: float = 0.1
    logit_scale: float = 100.0
    logit_init: float = 0.02
    logits_lr: float = 1e-3
    recoverability: str = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    class_dropout: float | None = None
    skip_dropped_backward: str = "auto"

    def __post_init__(self) -> None:
        if self.skip_dropped_backward not in SKIP_DROPPED:
            raise ValueError(f"skip_dropped_backward must be one of {SKIP_DROPPED}, got {self.skip_dropped_backward!r}")
        if self.recoverability not in RECOVERABILITY:
            raise ValueError(f"recoverability must be one of {RECOVERABILITY}, got {self.recoverability!r}")
        if self.temperature_start <= 0 or self.temperature_end <= 0:
            raise ValueError("temperatures must be positive")
        if self.logit_scale <= 0:
            raise ValueError(f"logit scale must be positive, got {self.logit_scale}")


class LearnablePruningJob(TrainingJob):
    """Gates + recoverability update on the model's own loss. Takes ownership of `model`
    (wraps it, may add adapters): pass a copy if the original is needed afterwards."""

    def __init__(self, model: nn.Module, settings: LearnableSettings, scheme: Scheme | None = None,
                 conditioning: Conditioning | None = None):
        """`scheme`: the parsed `settings.scheme` when the caller has it already (parsed once,
        at the edge); `conditioning`: the model's, with the data's empty prompt for text models."""
        self.settings = settings
        self.scheme = scheme if scheme is not None else parse_scheme(settings.scheme, depth_of(model))
        if self.scheme.depth != depth_of(model):
            raise ValueError(f"scheme {self.scheme} covers {self.scheme.depth} blocks but the model has {depth_of(model)}")
        check_scheme_lists(model, self.scheme)  # the decision may be any choice the scheme allows
        self.adapter = backbone(model)
        self.adapter.prepare()
        self.objective = make_objective(self.adapter.spec)
        self.class_dropout, self.conditioning = job_conditioning(model, settings.class_dropout, conditioning)
        if settings.recoverability == "lora":
            self.trainable_weights = add_lora(model, settings.lora_rank, settings.lora_alpha)
        elif settings.recoverability == "frozen":
            model.requires_grad_(False)
            self.trainable_weights = 0
        else:
            model.requires_grad_(True)
            self.trainable_weights = sum(p.numel() for p in model.parameters())
        gates = DepthGates(self.scheme, settings.logit_init, settings.logit_scale)
        self.module = GatedModel(model, gates, output_inputs=self.adapter.block_output_inputs)
        self.module.temperature = settings.temperature_start

    def setup(self, device: torch.device) -> None:
        super().setup(device)
        choice = self.settings.skip_dropped_backward
        self.module.skip_dropped = choice == "on" or (choice == "auto" and torch.device(device).type == "cpu")

    def prepare_compile(self, backend: str) -> None:
        # The skip splits every block's batch by this step's gates: new shapes each step, each
        # a recompilation (a 6-step digits run took 3.5 min). "auto" gives way to the compiler;
        # "on" is kept as asked.
        if self.settings.skip_dropped_backward == "auto":
            self.module.skip_dropped = False

    @property
    def gates(self) -> DepthGates:
        return self.module.gates

    def parameter_groups(self) -> list[dict[str, Any]]:
        # Weights first: the loop logs the first group's learning rate.
        weights = [p for p in self.module.backbone.parameters() if p.requires_grad]
        groups = [{"params": weights, "name": "weights"}] if weights else []  # the loop's lr (1e-4)
        return groups + [{"params": [self.gates.logits], "lr": self.settings.logits_lr, "name": "logits"}]

    def on_step_start(self, step: int, total_steps: int) -> None:
        s = self.settings
        self.module.temperature = linear_anneal(step, total_steps, s.temperature_start, s.temperature_end)

    def compute_loss(self, module: nn.Module, batch: Any, random: StepRandom) -> tuple[torch.Tensor, dict[str, Any]]:
        x0, t, noise, y = draw_inputs(self.objective, batch, random, self.class_dropout, self.conditioning)
        gate_noise = random.rand(self.gates.num_candidates)  # (N, C_total): one draw per image
        predict = self.adapter.predict
        terms = self.objective.training_losses(lambda x, tt: predict(x, tt, y, via=module, gate_noise=gate_noise), x0, t, noise)
        logs = {"mse": terms["mse"].mean(), "temperature": self.module.temperature}
        return terms["loss"].mean(), logs

    def on_step_end(self, step: int, module: nn.Module, ema_module: nn.Module | None) -> dict[str, Any]:
        """Per-block keep probability of the sampling distribution, and per-group confidence
        of the decision (EMA logits), for the log and the decision plot: tensors, which the
        loop reads at its log steps only."""
        with torch.no_grad():
            keep = self.gates.layer_probabilities()
            decider = ema_module.gates if ema_module is not None else self.gates
            confidences = torch.stack([p.max() for p in decider.group_probabilities()])
        logs: dict[str, Any] = {f"keep_prob/{i:03d}": p for i, p in enumerate(keep.unbind())}
        logs.update({f"confidence/{g:03d}": c for g, c in enumerate(confidences.unbind())})
        logs["min_confidence"] = confidences.min()
        return logs

    def decision(self, ema_module: nn.Module | None, steps: int) -> PruningDecision:
        """The learned choice: per group the most likely candidate of the EMA logits."""
        gates = ema_module.gates if ema_module is not None else self.gates
        kept = mask_to_indices(gates.decision_mask())
        details = {
            "steps": steps,
            "settings": asdict(self.settings),
            "decided_by": "ema_logits" if ema_module is not None else "logits",
            "layer_keep_probability": [round(float(p), 6) for p in gates.layer_probabilities()],
        }
        return PruningDecision(
            "learnable", str(self.scheme), self.scheme.depth, kept,
            groups=group_records(self.scheme, kept, gates.confidences()), details=details,
        )
