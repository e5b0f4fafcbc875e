"""The one training loop: exact resume, schedules, EMA, NaN guard, checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.data import TensorDataset

from leandit.diffusion import GaussianDiffusion, StepRandom
from leandit.models import load_model
from leandit.train import EMA, DenoisingJob, LoopConfig, Trainer, linear_anneal, lr_factor
from leandit.train.batches import StepBatches
from leandit.train.checkpoint import latest_checkpoint, list_checkpoints

from conftest import tiny_model


def toy_data(n: int = 64, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 1, 8, 8, generator=gen) * 2 - 1, torch.randint(0, 10, (n,), generator=gen))


def make_job(seed: int = 0) -> DenoisingJob:
    torch.manual_seed(seed)
    model = tiny_model()
    return DenoisingJob(model, GaussianDiffusion.dit(learn_sigma=True))


def loop_config(**overrides) -> LoopConfig:
    fields = dict(steps=6, global_batch_size=16, lr=1e-3, lr_schedule="cosine", warmup_steps=2, final_lr_ratio=0.5,
                  ema_decay=0.9, checkpoint_every=3, log_every=1, seed=3, precision="fp32")
    fields.update(overrides)
    return LoopConfig(**fields)


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs by {(a[k] - b[k]).abs().max()}"


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
    data = toy_data()
    job_a = make_job()
    result_a = Trainer(loop_config(), tmp_path / "a", device="cpu", progress=False).fit(job_a, data)

    job_b = make_job()
    first = Trainer(loop_config(), tmp_path / "b", device="cpu", progress=False).fit(job_b, data, stop_after=4)
    assert first.steps == 4
    assert latest_checkpoint(tmp_path / "b").name == "step-0000004"
    # A new process: fresh job and model (different init), everything must come from the checkpoint.
    job_c = make_job(seed=123)
    result_c = Trainer(loop_config(), tmp_path / "b", device="cpu", progress=False).fit(job_c, data)
    assert result_c.steps == 6
    assert_same(state(job_a.module), state(job_c.module))
    assert_same(state(result_a.ema), state(result_c.ema))
    # The metrics log of the resumed run has each step once, in order.
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_training_reduces_the_loss_and_writes_model_folders(tmp_path):
    data = toy_data(128)
    job = make_job()
    cfg = loop_config(steps=40, lr=3e-3, lr_schedule="constant", warmup_steps=0, checkpoint_every=20, keep_checkpoints=1)
    Trainer(cfg, tmp_path, device="cpu", progress=False).fit(job, data)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(r["mse"] for r in lines[:5]) / 5, sum(r["mse"] for r in lines[-5:]) / 5
    assert last < 0.8 * first
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000040"]  # keep_checkpoints=1
    # Every checkpoint of a backbone is a model folder that loads (EMA preferred).
    loaded = load_model(tmp_path / "checkpoints" / "step-0000040")
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 900]), torch.tensor([1, 2])
    assert loaded(x, t, y).shape == (2, 2, 8, 8)


class PoisonedJob(DenoisingJob):
    """Returns a NaN loss at chosen steps."""

    def __init__(self, *args, bad_steps=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.bad_steps, self.step = set(bad_steps), 0

    def on_step_start(self, step, total_steps):
        self.step = step

    def compute_loss(self, module, batch, random):
        loss, logs = super().compute_loss(module, batch, random)
        return (loss * math.nan if self.step in self.bad_steps else loss), logs


def test_nan_guard_skips_the_step_and_counts_it(tmp_path):
    torch.manual_seed(0)
    job = PoisonedJob(tiny_model(), GaussianDiffusion.dit(), bad_steps={2})
    cfg = loop_config(steps=4, ema_decay=0.5)
    trainer = Trainer(cfg, tmp_path, device="cpu", progress=False)
    before = {}
    original_end = job.on_step_end

    def on_step_end(step, module, ema_module):
        before[step] = (state(module), state(ema_module))
        return original_end(step, module, ema_module)

    job.on_step_end = on_step_end
    result = trainer.fit(job, toy_data())
    assert result.skipped_steps == 1
    assert_same(before[1][0], before[2][0])  # the poisoned step changed no weight ...
    assert_same(before[1][1], before[2][1])  # ... and no EMA weight
    assert all(torch.isfinite(v).all() for v in state(job.module).values())
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1]
    assert "loss" not in records[2]  # a skipped step's NaN loss is not averaged into the log


def test_resume_refuses_a_different_batch_size(tmp_path):
    Trainer(loop_config(steps=2), tmp_path, device="cpu", progress=False).fit(make_job(), toy_data())
    with pytest.raises(ValueError, match="global_batch_size"):
        Trainer(loop_config(steps=4, global_batch_size=8), tmp_path, device="cpu", progress=False).fit(make_job(), toy_data())


def test_step_batches_are_a_partition_of_each_epoch_and_split_across_ranks():
    full = StepBatches(50, 8, seed=1, total_steps=12)
    assert full.steps_per_epoch == 6
    epoch0 = [i for step in range(6) for i in full.indices(step)]
    assert len(set(epoch0)) == 48  # no repeats within an epoch; 2 items dropped
    assert full.indices(6) != full.indices(0)  # a new shuffle each epoch
    ranks = [StepBatches(50, 8, seed=1, rank=r, world_size=2, total_steps=12) for r in range(2)]
    for step in range(12):
        assert ranks[0].indices(step) + ranks[1].indices(step) == full.indices(step)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StepBatches(5, 8, total_steps=1)


def test_lr_schedules_hit_their_endpoints_and_survive_one_step_runs():
    assert lr_factor(0, 10, "constant", warmup_steps=4) == pytest.approx(0.25)
    assert lr_factor(3, 10, "constant", warmup_steps=4) == 1.0
    assert lr_factor(0, 100, "cosine", final_ratio=0.5) == 1.0
    assert lr_factor(99, 100, "cosine", final_ratio=0.5) == pytest.approx(0.5)
    assert lr_factor(50, 101, "cosine", final_ratio=0.0) == pytest.approx(0.5)
    assert lr_factor(99, 100, "linear", final_ratio=0.0) == pytest.approx(0.0)
    assert lr_factor(0, 1, "cosine", final_ratio=0.5) == 1.0  # no division by zero
    assert linear_anneal(0, 5, 4.0, 0.1) == 4.0 and linear_anneal(4, 5, 4.0, 0.1) == pytest.approx(0.1)
    assert linear_anneal(0, 1, 4.0, 0.1) == 0.1


def test_ema_update_matches_the_formula():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    old = state(ema.shadow)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    expected = 0.9 * old["weight"] + 0.1 * model.weight.detach()
    assert torch.allclose(ema.shadow.weight, expected, atol=1e-7)
    warm = EMA(model, decay=0.9999, warmup=True)
    assert warm.current_decay() == pytest.approx(0.1)


def test_step_random_gives_each_step_its_own_draw():
    a, b = StepRandom(0, 1, 4, 0, 1, "cpu"), StepRandom(0, 2, 4, 0, 1, "cpu")
    assert not torch.equal(a.randn(3), b.randn(3))
    assert torch.equal(StepRandom(0, 1, 4, 0, 1, "cpu").randn(3), StepRandom(0, 1, 4, 0, 1, "cpu").randn(3))
