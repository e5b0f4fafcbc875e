"""benchmarks/reference_step_speed.py re-implements the TinyFusion reference's training steps
to time leandit against them: its diffusion loss must be the one leandit computes (or the
comparison times different work), and the script must keep running."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from leandit.diffusion import GaussianDiffusion

from conftest import tiny_model

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "reference_step_speed.py"


@pytest.fixture
def reference(monkeypatch):
    spec = importlib.util.spec_from_file_location("benchmark_reference_step_speed", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_the_reference_diffusion_loss_is_leandits(reference):
    torch.manual_seed(0)
    model = tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # a real variance output, not adaLN-Zero's zeros
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(16, 1, 8, 8, generator=gen) * 2 - 1
    t = torch.cat([torch.tensor([0, 1, 999]), torch.randint(0, 1000, (13,), generator=gen)])
    noise = torch.randn(16, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (16,), generator=gen)
    with torch.no_grad():
        ours = GaussianDiffusion.dit().training_losses(lambda x, tt: model(x, tt, y), x0, t, noise)
        theirs = reference.ReferenceDiffusion().training_losses(model, x0, t, y, noise)
    torch.testing.assert_close(theirs["mse"], ours["mse"])
    later = t > 0
    torch.testing.assert_close(theirs["loss"][later], ours["loss"][later], rtol=1e-4, atol=1e-6)
    # t = 0: the decoder NLL, where the reference's tanh approximation of the normal CDF differs.
    torch.testing.assert_close(theirs["loss"][~later], ours["loss"][~later], rtol=2e-2, atol=1e-3)


def test_the_reference_gates_keep_whole_blocks_per_image(reference):
    torch.manual_seed(0)
    dit = tiny_model(depth=4)
    gated = reference.ReferenceGatedDiT(copy.deepcopy(dit), "1:2", class_dropout=0.0).eval()
    with torch.no_grad():
        for gate in gated.gumbel_gates:
            gate.fill_(0.0)
            gate[0, 0] = 10.0  # candidate 0 of a 1:2 group keeps its first block
        gated.tau = 0.01
        x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([5, 50, 500]), torch.tensor([0, 1, 2])
        kept = dit.__class__(dit.config)
        kept.load_state_dict(dit.state_dict())
        kept.blocks = torch.nn.ModuleList([kept.blocks[0], kept.blocks[2]])
        torch.testing.assert_close(gated(x, t, y), kept(x, t, y))


def test_the_benchmark_runs_at_a_tiny_size(reference, capsys):
    reference.main(["--shapes", "tiny", "--rounds", "1", "--steps", "1", "--no-compile"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| learnable") or line.startswith("| masked-kd")]
    assert len(rows) == 4 + 3  # learnable: reference + 3 leandit rows; masked KD: reference + 2
