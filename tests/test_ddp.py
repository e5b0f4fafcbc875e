"""DDP on 2 CPU processes (gloo): the same run on 1 or 2 processes, and the NaN guard."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

import leandit

from conftest import ROOT

TINY = ["--model", "DiT-S/2", "--set", "input_size=8", "--set", "in_channels=1", "--set", "hidden_size=32",
        "--set", "num_heads=2", "--set", "depth=2", "--set", "num_classes=10", "--set", "space=\"pixel\""]


def torchrun(nproc: int, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def train_args(out: Path) -> list[str]:
    return ["-m", "leandit.cli", "train", *TINY, "--data", "digits", "--steps", "5", "--batch-size", "32",
            "--lr", "1e-3", "--ema-decay", "0.9", "--checkpoint-every", "5", "--log-every", "1", "--device", "cpu",
            "--precision", "fp32", "--out", str(out), "--quiet"]


def test_two_processes_train_like_one_and_resume_exactly(tmp_path):
    torchrun(1, *train_args(tmp_path / "one"), cwd=ROOT)
    torchrun(2, *train_args(tmp_path / "two"), cwd=ROOT)
    one = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    last = load_file(str(tmp_path / "one" / "checkpoints" / "step-0000005" / "model.safetensors"))
    assert all(torch.equal(one[k], last[k]) for k in one)  # the final model folder holds the last step's weights
    # The runs trained: the weights left the initialisation that --seed 0 gives.
    torch.manual_seed(0)
    init = leandit.build_model("DiT-S/2", input_size=8, in_channels=1, hidden_size=32, num_heads=2, depth=2,
                               num_classes=10, space="pixel").state_dict()
    assert min((one[k] - init[k]).abs().max().item() for k in one if "blocks.0.attn" in k) > 1e-4
    # Gradients are averaged over the same global batch: only float summation order differs.
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst < 1e-4, worst
    first = (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()
    second = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(first) == len(second) == 5

    # Two processes stopped after 2 steps and resumed reach the uninterrupted 2-process weights.
    torchrun(2, *train_args(tmp_path / "resumed"), "--stop-after", "2", cwd=ROOT)
    torchrun(2, *train_args(tmp_path / "resumed"), cwd=ROOT)
    resumed = load_file(str(tmp_path / "resumed" / "model" / "ema.safetensors"))
    straight = load_file(str(tmp_path / "two" / "model" / "ema.safetensors"))
    assert all(torch.equal(resumed[k], straight[k]) for k in resumed)


NAN_SCRIPT = textwrap.dedent(
    """
    import json, math, sys, torch
    import torch.distributed as dist
    from torch.utils.data import TensorDataset
    import leandit
    from leandit.diffusion import GaussianDiffusion
    from leandit.train import DenoisingJob, LoopConfig, Trainer, setup_distributed

    class Poisoned(DenoisingJob):
        step = 0
        def on_step_start(self, step, total):
            self.step = step
        def compute_loss(self, module, batch, random):
            loss, logs = super().compute_loss(module, batch, random)
            # Only rank 1 sees a non-finite loss, only at step 2, and its gradients stay finite
            # (d(loss + inf)/d(loss) = 1): only the all-reduced decision makes rank 0 skip too.
            if self.step == 2 and dist.get_rank() == 1:
                loss = loss + math.inf
            return loss, logs

    env = setup_distributed("cpu")
    torch.manual_seed(0)
    model = leandit.build_model("DiT-S/2", input_size=8, in_channels=1, hidden_size=32, num_heads=2, depth=2,
                                num_classes=10, space="pixel")
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(64, 1, 8, 8, generator=gen), torch.randint(0, 10, (64,), generator=gen))
    config = LoopConfig(steps=4, global_batch_size=16, lr=1e-3, ema_decay=0.9, checkpoint_every=4, log_every=1, precision="fp32")
    result = Trainer(config, sys.argv[1], dist=env, progress=False).fit(Poisoned(model, GaussianDiffusion.dit()), data)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    same = bool(torch.equal(gathered[0], gathered[1]))
    # One file per rank: two processes printing to one pipe can interleave their lines.
    report = {"rank": env.rank, "skipped": result.skipped_steps, "replicas_equal": same, "finite": bool(torch.isfinite(flat).all())}
    with open(f"{sys.argv[1]}/report-{env.rank}.json", "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()
    """
)


def test_nan_on_one_rank_is_skipped_on_every_rank(tmp_path):
    script = tmp_path / "poisoned.py"
    script.write_text(NAN_SCRIPT)
    torchrun(2, str(script), str(tmp_path / "run"), cwd=ROOT)
    reports = [json.loads(path.read_text()) for path in sorted((tmp_path / "run").glob("report-*.json"))]
    assert len(reports) == 2
    for report in reports:
        assert report == {"rank": report["rank"], "skipped": 1, "replicas_equal": True, "finite": True}
