"""The one training loop. Every job that trains (teacher pre-training, mask learning,
recovery fine-tuning, dynamic-width and routing fine-tuning) is a `TrainingJob` run by it.

The loop owns what every job needs once: AdamW with per-group learning rates, a learning-rate
schedule, EMA, gradient clipping, bf16 autocast on GPUs, a NaN/inf guard that skips a step on
every process alike, periodic checkpoints with exact resume, a progress bar, a JSON-lines
metrics log and DDP under torchrun.

Determinism: data order (`StepBatches`) and the step's randomness (`StepRandom`) are pure
functions of (seed, step) over the global batch, so an interrupted and resumed run reaches
the same weights as an uninterrupted one, and K processes see what one process would.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..devices import PRECISIONS, check_compile, resolve_precision, warn_slow_bf16
from ..diffusion.noise import StepRandom
from .batches import StepBatches
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .distributed import DistEnv, all_gather_objects, all_reduce_, barrier, setup_distributed
from .ema import EMA
from .schedules import LR_SCHEDULES, lr_factor

METRICS_FILE = "metrics.jsonl"


@dataclass
class LoopConfig:
    """Settings of the training loop (the job decides what is trained and on which loss).

    Args:
        steps: total optimisation steps of the run (explicit: no epoch arithmetic).
        global_batch_size: images per step over all processes.
        lr: base learning rate of parameter groups that do not set their own.
        weight_decay, adam_betas: AdamW settings.
        lr_schedule: "constant", "cosine" or "linear" (to `final_lr_ratio` at the end),
            after `warmup_steps` of linear warm-up.
        ema_decay: EMA decay; None keeps no EMA. `ema_warmup` ramps it up early in the run.
        grad_clip: max global gradient norm; None or 0 disables clipping.
        precision: "auto" (bf16 autocast on GPUs that support it, else fp32), "fp32", "bf16"
            (also on CPUs: 5x faster matmuls where the CPU has native bf16).
        compile: run the step's forward (and a frozen teacher's) through torch.compile; the
            module itself stays uncompiled, so EMA, checkpoints and resume are as without.
        compile_backend: torch.compile's backend ("inductor"; the tests use "aot_eager").
        checkpoint_every: steps between checkpoints (the last step is always saved).
        keep_checkpoints: how many recent checkpoints to keep (0 keeps all).
        log_every: steps between metrics-log lines and progress-bar updates.
        seed: seeds data order, noise, timesteps and label drops.
        num_workers: DataLoader worker processes per training process.
    """

    steps: int
    global_batch_size: int
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    final_lr_ratio: float = 1.0
    ema_decay: float | None = 0.9999
    ema_warmup: bool = False
    grad_clip: float | None = 1.0
    precision: str = "auto"
    compile: bool = False
    compile_backend: str = "inductor"
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.global_batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {self.global_batch_size}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr schedule {self.lr_schedule!r}; choose one of {LR_SCHEDULES}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r} (fp16 is not supported: use bf16)")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError("checkpoint_every and log_every must be at least 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"the learning rate must be a positive number, got {self.lr}")
        if not (math.isfinite(self.final_lr_ratio) and self.final_lr_ratio >= 0):
            raise ValueError(f"the final learning-rate ratio must be 0 or more, got {self.final_lr_ratio}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight decay must be 0 or more, got {self.weight_decay}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ValueError(f"the gradient clip must be a positive norm (0 = off), got {self.grad_clip}")
        self.adam_betas = tuple(self.adam_betas)


class TrainingJob(ABC):
    """What a training run optimises. Subclasses set `module` and implement `compute_loss`.

    `module` holds everything trainable; the loop wraps it in DDP, keeps its EMA and
    checkpoints it. `compute_loss(module, batch, random)` gets the (possibly DDP-wrapped)
    module, the batch on the device and the step's `StepRandom`, and returns the scalar loss
    and a dict of scalars to log.
    """

    module: nn.Module
    find_unused_parameters: bool = False

    def setup(self, device: torch.device) -> None:
        """Move everything the job computes with to the device (a teacher, too)."""
        self.module.to(device)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups; a group may set its own "lr" (e.g. mask logits at 10x)."""
        return [{"params": [p for p in self.module.parameters() if p.requires_grad]}]

    @abstractmethod
    def compute_loss(self, module: nn.Module, batch: Any, random: StepRandom) -> tuple[torch.Tensor, dict[str, Any]]:
        """The scalar loss of this process's share of the batch, and scalars to log."""

    def prepare_compile(self, backend: str) -> None:
        """With --compile, before the first step: compile the frozen models the job calls
        itself (a teacher) in place, and turn off what would recompile every step; the loop
        compiles the trained module."""

    def on_step_start(self, step: int, total_steps: int) -> None:
        """Called before each step (for schedules such as a temperature)."""

    def on_step_end(self, step: int, module: nn.Module, ema_module: nn.Module | None) -> dict[str, Any]:
        """Called after each applied or skipped step; returned scalars are logged."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass
class TrainResult:
    steps: int
    skipped_steps: int
    ema: nn.Module | None
    run_dir: Path


class Trainer:
    def __init__(self, config: LoopConfig, run_dir: str | Path, *, dist: DistEnv | None = None, device: str = "auto", progress: bool = True):
        self.config = config
        self.run_dir = Path(run_dir)
        self.dist = dist or setup_distributed(device)
        self.progress = progress
        if config.global_batch_size % self.dist.world_size:
            raise ValueError(f"batch size {config.global_batch_size} is not divisible by {self.dist.world_size} processes")
        # Options this device cannot use fail here, before any work.
        precision = resolve_precision(config.precision, self.dist.device)
        if config.compile and config.compile_backend == "inductor":
            check_compile(self.dist.device)
        if self.dist.is_main:
            warn_slow_bf16(precision, self.dist.device)

    # -- helpers -----------------------------------------------------------------------------
    def uses_bf16(self) -> bool:
        """Whether steps run under bf16 autocast (so a frozen teacher may be kept in bf16)."""
        return resolve_precision(self.config.precision, self.dist.device) == "bf16"

    def _autocast(self):
        return torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.uses_bf16())

    def _set_lr(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        c = self.config
        factor = lr_factor(step, c.steps, c.lr_schedule, c.warmup_steps, c.final_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        return optimizer.param_groups[0]["lr"]

    def _training_state(self, step: int, optimizer, skipped: int, ema: EMA | None, job: TrainingJob) -> dict:
        rng = {"cpu": torch.get_rng_state()}
        if self.dist.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.dist.device)
        return {
            "format": 1,
            "step": step,
            "optimizer": optimizer.state_dict(),
            "skipped_steps": skipped,
            "ema": ema.state_dict() if ema else None,
            "job": job.state_dict(),
            "rng": all_gather_objects(rng),  # every process's own generator state
            "world_size": self.dist.world_size,
            "loop_config": dataclasses.asdict(self.config),
        }

    def _save(self, step, module, ema, optimizer, skipped, job) -> None:
        state = self._training_state(step, optimizer, skipped, ema, job)
        if self.dist.is_main:
            save_checkpoint(self.run_dir, step, module, ema.shadow if ema else None, state, self.config.keep_checkpoints)
        barrier()

    def _resume(self, module, ema, optimizer, job) -> tuple[int, int]:
        folder = latest_checkpoint(self.run_dir)
        if folder is None:
            return 0, 0
        state = load_checkpoint(folder, module, ema.shadow if ema else None)
        saved = state.get("loop_config", {})
        for key in ("global_batch_size", "seed"):
            if saved.get(key) != getattr(self.config, key):
                raise ValueError(
                    f"cannot resume {folder}: it was trained with {key}={saved.get(key)}, this run asks "
                    f"{key}={getattr(self.config, key)}; use the same value or a new output folder"
                )
        base_lrs = [g["base_lr"] for g in optimizer.param_groups]
        optimizer.load_state_dict(state["optimizer"])
        # The learning rates of this command apply from here on (the optimizer state would
        # otherwise silently keep the old ones).
        for group, lr in zip(optimizer.param_groups, base_lrs):
            if group["base_lr"] != lr and self.dist.is_main:
                print(f"note: learning rate {group['base_lr']:g} -> {lr:g} from step {state['step']}", file=sys.stderr)
            group["base_lr"] = lr
        if ema and state.get("ema"):
            ema.load_state_dict(state["ema"])
        job.load_state_dict(state.get("job", {}))
        rngs = state.get("rng", [])
        if len(rngs) == self.dist.world_size:
            torch.set_rng_state(rngs[self.dist.rank]["cpu"])
            if "cuda" in rngs[self.dist.rank] and self.dist.device.type == "cuda":
                torch.cuda.set_rng_state(rngs[self.dist.rank]["cuda"], self.dist.device)
        if self.dist.is_main:
            print(f"resuming from {folder} (step {state['step']})", file=sys.stderr, flush=True)
        return int(state["step"]), int(state.get("skipped_steps", 0))

    def _truncate_metrics(self, step: int) -> None:
        """Drop log lines past the resumed step (written after the last checkpoint)."""
        path = self.run_dir / METRICS_FILE
        if not (self.dist.is_main and path.exists()):
            return
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in kept))

    # -- the loop ----------------------------------------------------------------------------
    def fit(
        self,
        job: TrainingJob,
        dataset: Dataset,
        *,
        resume: bool = True,
        collate_fn: Callable | None = None,
        stop_after: int | None = None,
    ) -> TrainResult:
        """Train `job.module` on `dataset` for `config.steps` steps (resuming if possible).

        `stop_after` ends this invocation after that many steps (with a checkpoint), leaving
        the run resumable: for time-sliced jobs and for testing resume.
        """
        c, d = self.config, self.dist
        torch.manual_seed(c.seed * 1000 + d.rank)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        job.setup(d.device)
        module = job.module
        ema = EMA(module, c.ema_decay, c.ema_warmup) if c.ema_decay is not None else None
        optimizer, params = self._optimizer(job)
        start, skipped = self._resume(module, ema, optimizer, job) if resume else (0, 0)
        self._truncate_metrics(start)
        if start >= c.steps:
            return TrainResult(start, skipped, ema.shadow if ema else None, self.run_dir)
        end = c.steps if stop_after is None else min(c.steps, start + stop_after)
        train_module = self._distributed(module, job)
        if c.compile:
            train_module = torch.compile(train_module, backend=c.compile_backend)
            job.prepare_compile(c.compile_backend)
        batches, loader = self._loader(dataset, start, end, collate_fn)
        log = _IntervalLog(self, batches, open(self.run_dir / METRICS_FILE, "a") if d.is_main else None, start)
        interrupt = _InterruptFlag()
        # Nothing below reads a number of the step back to the host, except at log and
        # checkpoint steps: a GPU queues step after step without waiting for one to finish.
        skipped_total = torch.tensor(float(skipped), dtype=torch.float64, device=d.device)
        try:
            module.train()
            for step, batch in zip(range(start, end), loader):
                loss, logs, grad_norm, bad = self._step(job, train_module, params, optimizer, batch, step)
                applied = ~bad
                skipped_total += bad
                if ema:
                    ema.update(module, applied)
                logs = {**logs, **job.on_step_end(step, module, ema.shadow if ema else None)}
                done = step + 1
                log.add({"loss": loss, "grad_norm": grad_norm, **logs}, applied)
                at_log = done % c.log_every == 0 or done == end
                stop = self._stop_requested(interrupt, at_log)
                if at_log or stop:
                    skipped = int(skipped_total)
                    log.write(done, step, optimizer.param_groups[0]["lr"], skipped)
                log.bar.update(1)
                if done % c.checkpoint_every == 0 or done == end or stop:
                    skipped = int(skipped_total)
                    self._save(done, module, ema, optimizer, skipped, job)
                if stop:
                    if d.is_main:
                        print(f"\ninterrupted: checkpoint saved at step {done}; run the same command to resume", file=sys.stderr, flush=True)
                    raise KeyboardInterrupt
        finally:
            interrupt.restore()
            log.close()
        skipped = int(skipped_total)
        return TrainResult(end, skipped, ema.shadow if ema else None, self.run_dir)

    def _optimizer(self, job: TrainingJob) -> tuple[torch.optim.Optimizer, list[nn.Parameter]]:
        """AdamW over the job's parameter groups (a group may set its own lr)."""
        c = self.config
        groups = job.parameter_groups()
        for group in groups:
            group.setdefault("lr", c.lr)
            group["base_lr"] = group["lr"]
        params = [p for g in groups for p in g["params"]]
        if not params:
            raise ValueError("the job has no trainable parameters")
        # Fused: one kernel for every tensor, and a step skipped on the device (found_inf).
        return torch.optim.AdamW(groups, lr=c.lr, betas=c.adam_betas, weight_decay=c.weight_decay, fused=True), params

    def _distributed(self, module: nn.Module, job: TrainingJob) -> nn.Module:
        """The module the step calls: DDP-wrapped under torchrun."""
        d = self.dist
        if not d.distributed:
            return module
        return DistributedDataParallel(
            module,
            device_ids=[d.device.index] if d.device.type == "cuda" else None,
            find_unused_parameters=job.find_unused_parameters,
        )

    def _loader(self, dataset: Dataset, start: int, end: int, collate_fn: Callable | None) -> tuple[StepBatches, DataLoader]:
        """This process's batches of steps start..end-1 (a pure function of seed and step)."""
        c, d = self.config, self.dist
        batches = StepBatches(
            len(dataset), c.global_batch_size, seed=c.seed, rank=d.rank, world_size=d.world_size, start_step=start, total_steps=end
        )
        loader = DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=c.num_workers,
            pin_memory=d.device.type == "cuda",
            collate_fn=collate_fn,
            persistent_workers=False,
        )
        return batches, loader

    def _step(self, job, train_module, params, optimizer, batch, step: int):
        """One optimisation step: (loss, logs, grad norm, skipped), the last a 0-d bool
        tensor on the device that is the same on every process."""
        c, d = self.config, self.dist
        job.on_step_start(step, c.steps)
        self._set_lr(optimizer, step)
        batch = _to_device(batch, d.device)
        random = StepRandom(c.seed, step, c.global_batch_size, d.rank, d.world_size, d.device)
        with self._autocast():
            loss, logs = job.compute_loss(train_module, batch, random)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, c.grad_clip if c.grad_clip else math.inf, foreach=True)
        # A non-finite loss or gradient on any process skips the step on every process (or
        # DDP replicas drift apart). The fused AdamW skips it on the device: found_inf != 0
        # leaves weights, moments and step counts as they were.
        bad = (~(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))).float()
        bad = all_reduce_(bad, "max")
        optimizer.found_inf = bad
        optimizer.step()
        return loss, logs, grad_norm, bad > 0

    def _stop_requested(self, interrupt: "_InterruptFlag", at_log: bool) -> bool:
        """Whether a signal asks to stop after this step. One process stops at once; under
        torchrun the processes agree at the next log step (one reduction there, not one per
        step), so every process stops after the same step."""
        if not self.dist.distributed:
            return interrupt.raised
        if not at_log:
            return False
        flag = torch.tensor([float(interrupt.raised)], device=self.dist.device)
        return bool(all_reduce_(flag, "max").item() > 0)

    def _reduce_logs(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        """Means over the interval's applied steps on all processes (one host read)."""
        keys = sorted(sums)
        if not keys:
            return {}
        values = torch.stack([sums[k].to(device=self.dist.device, dtype=torch.float64) for k in keys])
        totals = dict(zip(keys, all_reduce_(values, "sum").tolist()))
        n = totals.pop("_n")
        return {k: v / n for k, v in totals.items()} if n > 0 else {}


class _IntervalLog:
    """The progress bar and metrics.jsonl: scalars averaged over each logging interval's
    applied steps on all processes."""

    def __init__(self, trainer: Trainer, batches: StepBatches, metrics, start: int):
        self.trainer, self.batches, self.metrics = trainer, batches, metrics
        d = trainer.dist
        self.bar = tqdm(total=trainer.config.steps, initial=start, disable=not (d.is_main and trainer.progress),
                        desc="train", dynamic_ncols=True)
        self.sums: dict[str, float] = {}
        self.count, self.last_time = 0, time.perf_counter()

    def add(self, logs: dict[str, Any], applied: torch.Tensor | None = None) -> None:
        """One step's scalars; a step whose `applied` is false only counts for the rates."""
        _accumulate(self.sums, logs, applied)
        self.count += 1

    def write(self, done: int, step: int, lr: float, skipped: int) -> None:
        record = self.trainer._reduce_logs(self.sums)
        now = time.perf_counter()
        record.update(
            step=done,
            epoch=self.batches.epoch_of(step),
            lr=lr,
            skipped_steps=skipped,
            steps_per_s=self.count / (now - self.last_time),
            images_per_s=self.count * self.trainer.config.global_batch_size / (now - self.last_time),
        )
        if self.metrics:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
        self.bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4g}", skipped=skipped)
        self.sums, self.count, self.last_time = {}, 0, now

    def close(self) -> None:
        self.bar.close()
        if self.metrics:
            self.metrics.close()


class _InterruptFlag:
    """Turns the first Ctrl-C (SIGINT) or SIGTERM (a cluster's pre-emption notice) into a flag
    the loop acts on at the end of the step (under torchrun: of the next log step, where the
    processes agree), so the checkpoint it saves is exact; a second signal acts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.raised = False
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.raised = True
        self.restore()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _accumulate(sums: dict[str, torch.Tensor], logs: dict[str, Any], applied: torch.Tensor | None = None) -> None:
    """Add one step's scalars to the interval's sums, on the device (no host read); a step
    whose `applied` is false adds nothing (its values may be NaN)."""
    device = applied.device if applied is not None else torch.device("cpu")
    for key, value in logs.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().to(torch.float64).mean()
        else:  # a fill on the device, not a copy from the host (which would wait for the queue)
            value = torch.full((), float(value), dtype=torch.float64, device=device)
        if applied is not None:
            value = torch.where(applied, value.to(device), 0.0)
        sums[key] = sums[key] + value if key in sums else value
    one = torch.ones((), dtype=torch.float64) if applied is None else applied.to(torch.float64)
    sums["_n"] = sums["_n"] + one if "_n" in sums else one


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch
