"""A tiny SiT (flow objective, continuous t in [0, 1]) through every path a user takes:
`generate`, `leandit sample`, the trainer, `leandit train`, learnable pruning and recovery.

The independent side never calls leandit's network or transport: the network is the
functional re-computation of tests/dit_reference.py, fed the continuous t as SiT feeds it
(t = 0 noise, t = 1 data; the model's own output channels beyond C are SiT's unused sigma)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import dit_reference as ref
import leandit
from leandit.cli import main
from leandit.compress.depth import LearnablePruningJob, LearnableSettings, explicit, export_pruned, parse_scheme
from leandit.compress.recovery import RecoveryJob, RecoverySettings
from leandit.diffusion import PerSampleNoise, StepRandom, make_objective
from leandit.evaluate.sampling import generate, make_labels, to_uint8_images
from leandit.train import DenoisingJob, LoopConfig, Trainer
from leandit.train.batches import StepBatches

from conftest import randomize_

SIT = dict(input_size=8, in_channels=1, hidden_size=32, num_heads=2, num_classes=10, space="pixel")
SIT_SET = [a for k, v in SIT.items() for a in ("--set", f"{k}={json.dumps(v)}")]


def tiny_sit(depth: int = 2, seed: int = 0, std: float = 0.15) -> leandit.DiT:
    return randomize_(leandit.build_model("SiT-S/2", depth=depth, **SIT), std=std, seed=seed)


def reference_velocity(model, x, t, y) -> torch.Tensor:
    out = ref.reference_dit_forward(model.state_dict(), x, t, y, patch_size=model.config.patch_size,
                                    num_heads=model.config.num_heads)
    return out[:, : x.shape[1]]


def integrate(model, labels, sampler: str, steps: int, seed: int = 0) -> torch.Tensor:
    """SiT's ODE samplers written out: Euler, and Heun (trapezoid with an Euler predictor)."""
    x = PerSampleNoise(seed, range(len(labels))).randn((1, 8, 8))
    for i in range(steps):
        t0, t1 = i / steps, (i + 1) / steps
        v = reference_velocity(model, x, torch.full((len(x),), t0), labels)
        if sampler == "euler":
            x = x + (t1 - t0) * v
        else:
            v1 = reference_velocity(model, x + (t1 - t0) * v, torch.full((len(x),), t1), labels)
            x = x + (t1 - t0) * (v + v1) / 2
    return x.clamp(-1, 1)


def test_the_sit_config_is_a_flow_model_with_sigma_channels():
    model = tiny_sit()
    assert model.config.objective == "flow" and model.config.out_channels == 2
    assert type(make_objective(model.config)).__name__ == "LinearFlow"


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_generate_integrates_the_velocity_at_continuous_times(sampler):
    model = tiny_sit().eval()
    labels = torch.tensor([0, 3, 7, 10])  # 10 = the null class
    with torch.no_grad():
        x = generate(model, labels, sampler=sampler, steps=5, seed=0, batch_size=3, progress=False)
        expected = integrate(model, labels, sampler, 5)
    assert 0.05 < (expected - PerSampleNoise(0, range(4)).randn((1, 8, 8)).clamp(-1, 1)).abs().mean()  # it moved
    torch.testing.assert_close(x, expected, rtol=1e-4, atol=1e-4)
    # The SDE sampler runs too, seeded: the same seed gives the same samples, another seed others.
    with torch.no_grad():
        a, b = (generate(model, labels, sampler="sde", steps=4, seed=s, progress=False) for s in (0, 0))
        c = generate(model, labels, sampler="sde", steps=4, seed=1, progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.isfinite(a).all()
    with pytest.raises(ValueError, match="does not fit a flow model"):
        generate(model, labels, sampler="ddim", steps=2, progress=False)


def test_leandit_sample_of_a_sit_folder_uses_heun_by_default(tmp_path):
    model = tiny_sit()
    leandit.save_model(model, tmp_path / "sit")
    assert main(["sample", str(tmp_path / "sit"), "--num-samples", "6", "--steps", "3", "--device", "cpu", "--quiet",
                 "--out", str(tmp_path / "s")]) == 0
    with np.load(tmp_path / "s" / "samples.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert labels.tolist() == make_labels(6, 10).tolist()
    with torch.no_grad():
        expected = to_uint8_images(integrate(leandit.load_model(tmp_path / "sit"), torch.as_tensor(labels), "heun", 3), "pixel")
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1  # float rounding at a level boundary at most


def _twin_draws(random: StepRandom, x1: torch.Tensor, y: torch.Tensor, dropout: float, null_class: int):
    """The documented order of a step's draws: t, noise, label drops (then any job extras)."""
    t = random.rand()
    noise = random.randn(*x1.shape[1:])
    y = torch.where(random.rand() < dropout, torch.full_like(y, null_class), y) if dropout > 0 else y
    return t, noise, y


def _data(n=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 1, 8, 8, generator=gen) * 2 - 1, torch.randint(0, 10, (n,), generator=gen))


def test_the_trainer_minimises_the_velocity_error_of_a_sit(tmp_path):
    model = tiny_sit()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    data = _data()
    config = LoopConfig(steps=1, global_batch_size=8, lr=1e-3, ema_decay=None, log_every=1, seed=4, precision="fp32")
    Trainer(config, tmp_path, device="cpu", progress=False).fit(DenoisingJob(model, make_objective(model.config)), data)
    logged = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    # The first step's loss, from the initial weights on the first batch and the step's draws.
    indices = next(iter(StepBatches(len(data), 8, seed=4, total_steps=1)))
    x1, y = data.tensors[0][indices], data.tensors[1][indices]
    t, noise, y = _twin_draws(StepRandom(4, 0, 8, 0, 1, "cpu"), x1, y, model.config.class_dropout_prob, 10)
    assert 0 < t.min() and t.max() < 1 and not torch.equal(t, t.round())  # continuous times
    initial = tiny_sit()
    initial.load_state_dict(start)
    xt = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * noise
    expected = ((reference_velocity(initial, xt, t, y) - (x1 - noise)) ** 2).mean()
    assert logged["loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_leandit_train_writes_a_flow_model_whose_first_loss_is_the_velocity_error(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--model", "SiT-S/2", *SIT_SET, "--set", "depth=2", "--data", "digits", "--steps", "2",
                 "--batch-size", "8", "--lr", "1e-3", "--device", "cpu", "--precision", "fp32", "--log-every", "1",
                 "--checkpoint-every", "2", "--out", str(out), "--quiet"]) == 0
    model = leandit.load_model(out / "model")
    assert model.config.objective == "flow" and model.config.name.startswith("SiT")
    # adaLN-Zero: the fresh network predicts 0, so the first loss is E (x1 - x0)^2 of the batch.
    from leandit.data import digits_dataset

    data = digits_dataset()
    indices = next(iter(StepBatches(len(data), 8, seed=0, total_steps=2)))
    x1 = torch.stack([data[i][0] for i in indices])
    noise = StepRandom(0, 0, 8, 0, 1, "cpu")
    noise.rand()  # t first
    expected = ((x1 - noise.randn(*x1.shape[1:])) ** 2).mean()
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["mse"] == pytest.approx(expected.item(), rel=1e-5)


def test_learnable_pruning_of_a_sit_trains_on_the_velocity_loss(tmp_path):
    model = tiny_sit(depth=4)
    job = LearnablePruningJob(model, LearnableSettings(scheme="1:2", class_dropout=0.0))
    x1, y = _data(8).tensors
    loss, logs = job.compute_loss(job.module, (x1, y), StepRandom(2, 0, 8, 0, 1, "cpu"))
    random = StepRandom(2, 0, 8, 0, 1, "cpu")
    t, noise, _ = _twin_draws(random, x1, y, 0.0, 10)
    gate_noise = random.rand(job.gates.num_candidates)
    xt = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * noise
    with torch.no_grad():
        out = job.module(xt, t, y, gate_noise=gate_noise)
    assert loss.item() == pytest.approx(((out[:, :1] - (x1 - noise)) ** 2).mean().item(), rel=1e-6)
    # `leandit prune` of a SiT folder exports a shallower flow model.
    leandit.save_model(tiny_sit(depth=4), tmp_path / "sit")
    assert main(["prune", str(tmp_path / "sit"), "--method", "learnable", "--scheme", "1:2", "--steps", "2", "--batch-size", "8",
                 "--device", "cpu", "--precision", "fp32", "--quiet", "--out", str(tmp_path / "pruned")]) == 0
    pruned = leandit.load_model(tmp_path / "pruned" / "model")
    assert pruned.config.objective == "flow" and pruned.config.depth == 2


def test_recovery_of_a_sit_distils_the_velocity_only(tmp_path):
    teacher = tiny_sit(depth=4, seed=1)
    student = tiny_sit(depth=2, seed=2)
    job = RecoveryJob(student, teacher, RecoverySettings(class_dropout=0.0), teacher_layers=[1, 3])
    seen = {}
    teacher.register_forward_pre_hook(lambda m, args: seen.update(teacher=[a.clone() for a in args]))
    x1, y = _data(8).tensors
    _, logs = job.compute_loss(student, (x1, y), StepRandom(0, 0, 8, 0, 1, "cpu"))
    t, noise, _ = _twin_draws(StepRandom(0, 0, 8, 0, 1, "cpu"), x1, y, 0.0, 10)
    xt = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * noise
    torch.testing.assert_close(seen["teacher"][0], xt)
    assert torch.equal(seen["teacher"][1], t)  # the teacher sees the same continuous times
    with torch.no_grad():
        v_student, v_teacher = reference_velocity(student, xt, t, y), reference_velocity(teacher, xt, t, y)
        both = ref.reference_dit_forward(student.state_dict(), xt, t, y, patch_size=2, num_heads=2)
        both_teacher = ref.reference_dit_forward(teacher.state_dict(), xt, t, y, patch_size=2, num_heads=2)
    assert logs["kd"].item() == pytest.approx(((v_student - v_teacher) ** 2).mean().item(), rel=1e-5)
    all_channels = ((both - both_teacher) ** 2).mean().item()
    assert abs(all_channels - logs["kd"].item()) > 1e-3 * all_channels  # the sigma channels would change it
    assert logs["diffusion"].item() == pytest.approx(((v_student - (x1 - noise)) ** 2).mean().item(), rel=1e-5)
    # `leandit finetune` of a pruned SiT against its teacher.
    leandit.save_model(teacher, tmp_path / "teacher")
    export_pruned(leandit.load_model(tmp_path / "teacher"), explicit([0, 3], 4, parse_scheme("1:2", 4)), tmp_path / "student",
                  source_name="teacher")
    assert main(["finetune", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"), "--steps", "2",
                 "--batch-size", "8", "--device", "cpu", "--precision", "fp32", "--quiet", "--out", str(tmp_path / "ft")]) == 0
    record = json.loads((tmp_path / "ft" / "model" / "compression.json").read_text())[-1]
    assert record["method"] == "recovery" and leandit.load_model(tmp_path / "ft" / "model").config.objective == "flow"
