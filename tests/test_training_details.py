"""Loop settings that a wrong line would silently ignore: the pruning logits' own learning
rate, the `--ema-decay auto` rule as the commands apply it, and gradient clipping."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

import leandit
from leandit.cli import main
from leandit.diffusion import GaussianDiffusion
from leandit.train import DenoisingJob, LoopConfig, Trainer
from leandit.train.ema import ema_decay_for_steps

from conftest import randomize_, tiny_model

COMMON = ["--batch-size", "16", "--log-every", "1", "--checkpoint-every", "1", "--device", "cpu", "--precision", "fp32", "--quiet"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("details") / "teacher"
    leandit.save_model(randomize_(tiny_model(depth=4), std=0.15), folder)
    return folder


def _step(run, n=1, name="model"):
    return load_file(str(run / "checkpoints" / f"step-{n:07d}" / f"{name}.safetensors"))


def test_the_gate_logits_train_at_their_own_learning_rate(source, tmp_path):
    # Adam's first step moves every parameter with a clear gradient by lr (m / sqrt(v) = sign):
    # the logits by --logits-lr, the LoRA weights by --lr.
    run = tmp_path / "run"
    assert main(["prune", str(source), "--method", "learnable", "--scheme", "1:2", "--steps", "1", "--lr", "1e-4",
                 "--logits-lr", "1e-2", "--ema-decay", "0", "--grad-clip", "0", *COMMON, "--out", str(run)]) == 0
    after = _step(run)
    logits_move = (after["gates.logits"] - 0.02).abs().max().item()
    lora_move = max(after[k].abs().max().item() for k in after if "lora_B" in k)  # LoRA B starts at zero
    assert logits_move == pytest.approx(1e-2, rel=1e-3)
    assert lora_move == pytest.approx(1e-4, rel=1e-3)


@pytest.mark.parametrize("steps, expected", [(200, 0.95), (40, 0.9)])
def test_ema_decay_auto_is_one_minus_ten_over_the_run_length_in_the_ema_weights(source, tmp_path, steps, expected):
    assert ema_decay_for_steps(steps, maximum=0.999) == pytest.approx(expected)
    assert ema_decay_for_steps(10**6, maximum=0.999) == 0.999 and ema_decay_for_steps(10**6, maximum=0.9999) == 0.9999
    # One step of a `steps`-step run: ema = d * start + (1 - d) * weights gives the d applied.
    run = tmp_path / "run"
    assert main(["prune", str(source), "--method", "learnable", "--scheme", "1:2", "--steps", str(steps), "--stop-after", "1",
                 "--logits-lr", "1e-2", *COMMON, "--out", str(run)]) == 0
    start, weights, ema = 0.02, _step(run)["gates.logits"].double(), _step(run, name="ema")["gates.logits"].double()
    decay = (ema - weights) / (start - weights)
    assert decay.tolist() == pytest.approx([expected] * 4, abs=1e-4)


def test_finetune_ema_decay_auto_follows_the_run_length(tmp_path):
    from leandit.compress.depth import explicit, export_pruned, parse_scheme

    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    leandit.save_model(randomize_(tiny_model(depth=4), std=0.15), teacher_dir)
    export_pruned(leandit.load_model(teacher_dir), explicit([0, 3], 4, parse_scheme("1:2", 4)), student_dir, source_name="teacher")
    run = tmp_path / "run"
    assert main(["finetune", str(student_dir), "--teacher", str(teacher_dir), "--steps", "400", "--stop-after", "1",
                 "--lr", "1e-3", *COMMON, "--out", str(run)]) == 0
    start = load_file(str(student_dir / "model.safetensors"))
    weights, ema = _step(run), _step(run, name="ema")
    key = max(start, key=lambda k: (weights[k] - start[k]).abs().max().item())  # the most moved tensor
    moved = (weights[key] - start[key]).double()
    decay = ((ema[key] - weights[key]).double() * moved.sign()).sum() / (-moved.abs()).sum()
    assert decay.item() == pytest.approx(1 - 10 / 400, abs=1e-4)  # 0.975: inside [0.9, 0.9999]


class _Recorder(DenoisingJob):
    """The gradients the optimizer received at the first step, and a loss scaled up so that
    its gradient norm is far above the clip."""

    grads = None

    def compute_loss(self, module, batch, random):
        loss, logs = super().compute_loss(module, batch, random)
        return loss * 1e4, logs

    def on_step_end(self, step, module, ema_module):
        if step == 0:
            self.grads = [p.grad.detach().clone() for p in module.parameters()]
        return {}


def _first_gradients(tmp_path, clip):
    torch.manual_seed(0)
    job = _Recorder(tiny_model(), GaussianDiffusion.dit())
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(32, 1, 8, 8, generator=gen), torch.randint(0, 10, (32,), generator=gen))
    config = LoopConfig(steps=1, global_batch_size=16, lr=1e-3, ema_decay=None, grad_clip=clip, log_every=1, precision="fp32")
    Trainer(config, tmp_path / f"clip-{clip}", device="cpu", progress=False).fit(job, data)
    import json

    logged = json.loads((tmp_path / f"clip-{clip}" / "metrics.jsonl").read_text().splitlines()[0])
    return job.grads, logged["grad_norm"]


def test_gradient_clipping_rescales_the_applied_gradient_to_the_limit(tmp_path):
    free, free_norm = _first_gradients(tmp_path, None)
    clipped, clipped_norm = _first_gradients(tmp_path, 0.5)
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in free))
    assert norm > 10 and free_norm == pytest.approx(norm, rel=1e-5)
    assert clipped_norm == pytest.approx(norm, rel=1e-5)  # the log shows the norm before clipping
    applied = math.sqrt(sum(float(g.double().pow(2).sum()) for g in clipped))
    assert applied == pytest.approx(0.5, rel=1e-4)
    for a, b in zip(clipped, free):  # the same direction, scaled
        torch.testing.assert_close(a, b * (0.5 / norm), rtol=1e-4, atol=1e-9)
