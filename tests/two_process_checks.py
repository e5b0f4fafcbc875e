"""The two-process halves of the DDP checks, run by test_ddp.py in ONE torchrun launch (each
launch costs seconds of start-up and imports): `python -m torch.distributed.run
--nproc_per_node=2 tests/two_process_checks.py PLAN.json`.

PLAN.json holds {"commands": [argv, ...], "jobs": FOLDER}: every argv is run in order through
`leandit.cli.main`, as `torchrun ... -m leandit.cli ARGV` would run it, then the two training
jobs below write their reports under FOLDER. The single-process baselines run inside the
pytest process.

One process group serves every command: the commands find it joined (setup_distributed joins
only when no group exists) and their teardown is held back until the end. Re-creating a gloo
group in the same torchrun processes can hang: the new group's rendezvous keys collide with
the old ones in torchrun's store.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

import leandit
from leandit.diffusion import GaussianDiffusion
from leandit.train import DenoisingJob, LoopConfig, Trainer


def tiny_dit() -> leandit.DiT:
    torch.manual_seed(0)
    return leandit.build_model("DiT-S/2", input_size=8, in_channels=1, hidden_size=32, num_heads=2, depth=2,
                               num_classes=10, space="pixel")


def tiny_mar(seed: int = 0):
    """A 2 + 2-block MAR on digits' shape (8 x 8, one channel) with random weights: a fresh
    MAR's head outputs zero (zero-initialised final layer), which would make every gradient of
    the gates and every KD term trivially zero."""
    from leandit.models.mar import MAR
    from leandit.models.mar_config import MARConfig

    model = MAR(MARConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, encoder_depth=2, encoder_heads=2,
                          decoder_hidden_size=32, decoder_depth=2, decoder_heads=2, buffer_size=4, num_classes=10,
                          head_depth=2, head_width=32, space="pixel", attn_dropout=0.0, proj_dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    return model


def routed_source():
    """A 2-block routed DiT (the `leandit route` defaults: 4 regions, 10 bins) whose ratios sit
    between bins and whose routers are random, so the two-process route check really runs two
    capacities per block and region and mixes them (test_ddp's route-source folder)."""
    from leandit.compress.routing import RoutedModel

    gen = torch.Generator().manual_seed(3)
    dense = tiny_dit()
    with torch.no_grad():
        for p in dense.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    model = RoutedModel(dense)
    with torch.no_grad():
        model.ratios.copy_(torch.tensor([[0.55, 0.72, 0.38, 0.91], [0.66, 0.23, 0.84, 0.47]]))
        for block in model.routed_blocks:
            block.router.weight.copy_(torch.randn(block.router.weight.shape, generator=gen))
    return model


def toy_data() -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.rand(64, 1, 8, 8, generator=gen), torch.randint(0, 10, (64,), generator=gen))


class Poisoned(DenoisingJob):
    """Only rank 1 sees a non-finite loss, only at step 2, and its gradients stay finite
    (d(loss + inf)/d(loss) = 1): only the all-reduced decision makes rank 0 skip too."""

    step = 0

    def on_step_start(self, step, total):
        self.step = step

    def compute_loss(self, module, batch, random):
        import torch.distributed as dist

        loss, logs = super().compute_loss(module, batch, random)
        if self.step == 2 and dist.is_initialized() and dist.get_rank() == 1:
            loss = loss + math.inf
        return loss, logs


class GradientRecorder(DenoisingJob):
    """Keeps the gradients the optimizer applied at the first step (after DDP's all-reduce):
    Adam is blind to their scale, so a sum instead of a mean over processes shows only here."""

    grads: dict[str, torch.Tensor] | None = None

    def on_step_end(self, step, module, ema_module):
        if step == 0:
            self.grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
        return {}


GRADIENT_CONFIG = dict(steps=1, global_batch_size=16, lr=1e-3, ema_decay=None, grad_clip=None, checkpoint_every=1,
                       log_every=1, precision="fp32")


def first_step_gradients(run_dir, dist_env=None) -> dict[str, torch.Tensor]:
    job = GradientRecorder(tiny_dit(), GaussianDiffusion.dit())
    Trainer(LoopConfig(**GRADIENT_CONFIG), run_dir, dist=dist_env, device="cpu", progress=False).fit(job, toy_data())
    return job.grads


def _jobs(folder: Path) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from leandit.train import setup_distributed

    env = setup_distributed("cpu")
    model = tiny_dit()
    config = LoopConfig(steps=4, global_batch_size=16, lr=1e-3, ema_decay=0.9, checkpoint_every=4, log_every=1, precision="fp32")
    result = Trainer(config, folder / "nan", dist=env, progress=False).fit(Poisoned(model, GaussianDiffusion.dit()), toy_data())
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    report = {"rank": env.rank, "skipped": result.skipped_steps, "replicas_equal": bool(torch.equal(gathered[0], gathered[1])),
              "finite": bool(torch.isfinite(flat).all())}
    # One file per rank: two processes printing to one pipe can interleave their lines.
    (folder / f"nan-report-{env.rank}.json").write_text(json.dumps(report))

    grads = first_step_gradients(folder / "gradients", env)
    save_file({k: v.contiguous() for k, v in grads.items()}, str(folder / f"gradients-{env.rank}.safetensors"))


def main(plan_path: str) -> int:
    from unittest import mock

    import torch.distributed as dist

    from leandit.cli import main as cli

    plan = json.loads(Path(plan_path).read_text())
    dist.init_process_group("gloo")
    with mock.patch.object(dist, "destroy_process_group", lambda *a, **k: None):
        for argv in plan["commands"]:
            code = cli(argv)
            if code != 0:
                print(f"leandit {' '.join(argv)} exited with {code}", file=sys.stderr)
                return 1
        folder = Path(plan["jobs"])
        folder.mkdir(parents=True, exist_ok=True)
        _jobs(folder)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
