"""DDP on 2 CPU processes (gloo): train, resume, learnable pruning, fine-tuning, DyDiT fine-tuning,
token routing (DiffCR), sampling, and MAR's learnable pruning and recovery on two processes give what one process gives, the gradients are averaged (not summed) over the
processes, and the NaN guard decides alike on every rank.

Every two-process run happens in ONE torchrun launch (tests/two_process_checks.py, started
once per module); each single-process baseline runs in this process through `leandit.cli.main`
(a world of one: the same code path as `torchrun --nproc_per_node=1` without its start-up)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import leandit
from leandit.cli import main
from leandit.compress.depth import explicit, export_pruned, parse_scheme
from leandit.evaluate.sampling import generate, make_labels, to_uint8_images

from conftest import ROOT, randomize_, tiny_model
from test_dynamic import mixed_model
from two_process_checks import first_step_gradients, routed_source, tiny_mar

pytestmark = pytest.mark.slow  # one torchrun launch of two processes: about a minute on 2 cores

TINY = ["--model", "DiT-S/2", "--set", "input_size=8", "--set", "in_channels=1", "--set", "hidden_size=32",
        "--set", "num_heads=2", "--set", "depth=2", "--set", "num_classes=10", "--set", "space=\"pixel\""]
LEARN = ["--method", "learnable", "--scheme", "1:2", "--batch-size", "16", "--log-every", "1", "--checkpoint-every", "3",
         "--device", "cpu", "--precision", "fp32", "--lr", "1e-3", "--quiet", "--steps", "3"]
LOOP = ["--batch-size", "16", "--log-every", "1", "--checkpoint-every", "2", "--device", "cpu", "--precision", "fp32", "--quiet"]
SAMPLE = ["--num-samples", "10", "--part-size", "3", "--sampler", "ddim", "--steps", "4", "--batch-size", "2", "--labels", "random",
          "--device", "cpu", "--quiet"]


def torchrun(nproc: int, *args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def train_args(out: Path) -> list[str]:
    return ["train", *TINY, "--data", "digits", "--steps", "5", "--batch-size", "32", "--lr", "1e-3", "--ema-decay", "0.9",
            "--checkpoint-every", "5", "--log-every", "1", "--device", "cpu", "--precision", "fp32", "--out", str(out), "--quiet"]


def prune_args(inputs: Path, out: Path) -> list[str]:
    return ["prune", str(inputs / "prune-source"), *LEARN, "--out", str(out)]


def finetune_args(inputs: Path, out: Path) -> list[str]:
    return ["finetune", str(inputs / "student"), "--teacher", str(inputs / "teacher"), "--steps", "3", "--out", str(out),
            "--lr", "1e-3", *LOOP]


def dynamic_args(inputs: Path, out: Path) -> list[str]:
    # From a dynamic model whose routers already make mixed decisions (heads, groups and tokens
    # both kept and skipped), so the masks and the all-reduced MAC loss are really exercised.
    return ["dynamic", str(inputs / "dynamic-source"), "--target", "0.5", "--steps", "3", "--out", str(out), "--lr", "1e-3",
            "--router-lr", "1e-3", *LOOP]


def route_args(inputs: Path, out: Path) -> list[str]:
    # From a routed model whose ratios sit between bins (two capacities run and mixed in every
    # block and region) and whose routers are random (the kept tokens differ per image).
    return ["route", str(inputs / "route-source"), "--target", "0.5", "--steps", "3", "--out", str(out), "--lr", "1e-3",
            "--router-lr", "1e-2", *LOOP]


def mar_prune_args(inputs: Path, out: Path) -> list[str]:
    return ["prune", str(inputs / "mar-source"), *LEARN, "--out", str(out)]


def mar_finetune_args(inputs: Path, out: Path) -> list[str]:
    # masked KD: the head's KD and RepKD on encoder and decoder states, each aligned in its list.
    return ["finetune", str(inputs / "mar-student"), "--teacher", str(inputs / "mar-source"), "--steps", "3", "--out", str(out),
            "--lr", "1e-3", *LOOP]


def sample_args(inputs: Path, out: Path) -> list[str]:
    return ["sample", str(inputs / "sampler"), *SAMPLE, "--out", str(out)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The inputs, then every two-process run in one torchrun launch; returns (inputs, runs)."""
    inputs, two = tmp_path_factory.mktemp("inputs"), tmp_path_factory.mktemp("two")
    leandit.save_model(randomize_(tiny_model(depth=4), std=0.15), inputs / "prune-source")
    leandit.save_model(randomize_(tiny_model(depth=4), std=0.15), inputs / "teacher")
    teacher = leandit.load_model(inputs / "teacher")
    export_pruned(teacher, explicit([0, 3], 4, parse_scheme("1:2", 4)), inputs / "student", source_name="teacher")
    leandit.save_model(randomize_(tiny_model(depth=2), std=0.1), inputs / "sampler")
    leandit.save_model(mixed_model(depth=2), inputs / "dynamic-source")
    leandit.save_model(routed_source(), inputs / "route-source")
    leandit.save_model(tiny_mar(), inputs / "mar-source")
    mar = leandit.load_model(inputs / "mar-source")
    export_pruned(mar, explicit([1, 2], 4, parse_scheme("1:2", 4)), inputs / "mar-student", source_name="mar-source")
    plan = {
        "commands": [
            train_args(two / "train"),
            [*train_args(two / "resumed"), "--stop-after", "2"],
            train_args(two / "resumed"),
            prune_args(inputs, two / "prune"),
            finetune_args(inputs, two / "finetune"),
            dynamic_args(inputs, two / "dynamic"),
            route_args(inputs, two / "route"),
            sample_args(inputs, two / "sample"),
            mar_prune_args(inputs, two / "mar-prune"),
            mar_finetune_args(inputs, two / "mar-finetune"),
        ],
        "jobs": str(two / "jobs"),
    }
    (two / "plan.json").write_text(json.dumps(plan))
    torchrun(2, str(ROOT / "tests" / "two_process_checks.py"), str(two / "plan.json"), cwd=ROOT)
    return inputs, two


def _main(argv: list[str]) -> None:
    assert main(argv) == 0


def test_two_processes_train_like_one_and_resume_exactly(runs, tmp_path):
    _, two_runs = runs
    _main(train_args(tmp_path / "one"))
    one = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    two = load_file(str(two_runs / "train" / "model" / "model.safetensors"))
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
    second = (two_runs / "train" / "metrics.jsonl").read_text().splitlines()
    assert len(first) == len(second) == 5

    # Two processes stopped after 2 steps and resumed reach the uninterrupted 2-process weights.
    resumed = load_file(str(two_runs / "resumed" / "model" / "ema.safetensors"))
    straight = load_file(str(two_runs / "train" / "model" / "ema.safetensors"))
    assert all(torch.equal(resumed[k], straight[k]) for k in resumed)


def test_gradients_are_averaged_over_the_processes_not_summed(runs, tmp_path):
    _, two_runs = runs
    one = first_step_gradients(tmp_path / "one")
    ranks = [load_file(str(two_runs / "jobs" / f"gradients-{r}.safetensors")) for r in (0, 1)]
    assert one.keys() == ranks[0].keys() == ranks[1].keys()
    assert sum(g.abs().sum() for g in one.values()) > 0
    for k in one:
        assert torch.equal(ranks[0][k], ranks[1][k]), k  # the replicas apply the same all-reduced gradient
        # the mean of the two half-batch gradients is the full batch's (a sum would be 2x)
        torch.testing.assert_close(ranks[0][k], one[k], rtol=1e-4, atol=1e-7, msg=k)


def test_nan_on_one_rank_is_skipped_on_every_rank(runs):
    _, two_runs = runs
    reports = [json.loads(path.read_text()) for path in sorted((two_runs / "jobs").glob("nan-report-*.json"))]
    assert len(reports) == 2
    for report in reports:
        assert report == {"rank": report["rank"], "skipped": 1, "replicas_equal": True, "finite": True}


def test_learnable_under_torchrun_on_two_processes_matches_one(runs, tmp_path):
    inputs, two_runs = runs
    _main(prune_args(inputs, tmp_path / "one"))
    one = load_file(str(tmp_path / "one" / "checkpoints" / "step-0000003" / "model.safetensors"))
    two = load_file(str(two_runs / "prune" / "checkpoints" / "step-0000003" / "model.safetensors"))
    assert not torch.allclose(one["gates.logits"], torch.full((4,), 0.02))  # the logits trained
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    assert (two_runs / "prune" / "model" / "compression.json").exists()


def test_two_processes_fine_tune_like_one(runs, tmp_path):
    inputs, two_runs = runs
    _main(finetune_args(inputs, tmp_path / "one"))
    one = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    two = load_file(str(two_runs / "finetune" / "model" / "model.safetensors"))
    start = load_file(str(inputs / "student" / "model.safetensors"))
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 1e-4  # it trained
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-4  # Adam amplifies summation order
    # The first step's losses are per-sample means: the two halves average to the whole batch's.
    first = [json.loads((folder / "metrics.jsonl").read_text().splitlines()[0])
             for folder in (tmp_path / "one", two_runs / "finetune")]
    for key in ("loss", "kd", "kd_kl", "diffusion", "repkd", "repkd_dropped"):
        assert first[0][key] == pytest.approx(first[1][key], rel=1e-5, abs=1e-9), key


def test_dydit_on_two_processes_trains_like_one(runs, tmp_path):
    inputs, two_runs = runs
    _main(dynamic_args(inputs, tmp_path / "one"))
    source = load_file(str(inputs / "dynamic-source" / "wrapper-0-dydit.safetensors"))
    for name in ("model.safetensors", "wrapper-0-dydit.safetensors", "ema.safetensors"):
        one = load_file(str(tmp_path / "one" / "model" / name))
        two = load_file(str(two_runs / "dynamic" / "model" / name))
        assert one.keys() == two.keys()
        for k in one:
            a, b = one[k], two[k]
            if k.endswith("attn.qkv.bias"):
                # The key bias shifts every score of a query alike: softmax cancels it, so its
                # gradient is rounding noise that Adam scales up to about lr. Its q and v parts count.
                a, b = torch.cat(a.chunk(3)[::2]), torch.cat(b.chunk(3)[::2])
            assert (a - b).abs().max() < 1e-5, (name, k)  # Adam amplifies summation order
    routers = load_file(str(tmp_path / "one" / "model" / "wrapper-0-dydit.safetensors"))
    for part in ("width_routers.heads.bias", "width_routers.groups.weight", "token_router.net.0.weight", "token_router.net.2.bias"):
        assert (routers[f"1.{part}"] - source[f"1.{part}"]).abs().max() > 1e-4, part  # every kind of router trained
    # The MAC ratio is the global batch's on every process: the same logged values.
    for line in range(3):
        first = [json.loads((folder / "metrics.jsonl").read_text().splitlines()[line])
                 for folder in (tmp_path / "one", two_runs / "dynamic")]
        for key in ("loss", "diffusion", "macs_ratio", "flops_loss"):
            assert first[0][key] == pytest.approx(first[1][key], rel=1e-5, abs=1e-9), (line, key)
    assert 0.2 < first[0]["macs_ratio"] < 0.9  # mixed decisions: neither dense nor the floor


def test_token_routing_on_two_processes_trains_like_one(runs, tmp_path):
    """3 RouteJob steps of `leandit route` (regions stratified by global batch index, each
    process routing its half of the batch): the weights, routers, ratios and EMA after the
    steps and every logged loss are the one-process run's."""
    inputs, two_runs = runs
    _main(route_args(inputs, tmp_path / "one"))
    source = load_file(str(inputs / "route-source" / "wrapper-0-diffcr.safetensors"))
    for name in ("model.safetensors", "wrapper-0-diffcr.safetensors", "ema.safetensors"):
        one = load_file(str(tmp_path / "one" / "model" / name))
        two = load_file(str(two_runs / "route" / "model" / name))
        assert one.keys() == two.keys()
        for k in one:
            a, b = one[k], two[k]
            if k.endswith("attn.qkv.bias"):  # the key bias: rounding noise scaled up by Adam (see the DyDiT check)
                a, b = torch.cat(a.chunk(3)[::2]), torch.cat(b.chunk(3)[::2])
            assert (a - b).abs().max() < 1e-5, (name, k)
    routers = load_file(str(tmp_path / "one" / "model" / "wrapper-0-diffcr.safetensors"))
    for k in ("blocks.0.router.weight", "blocks.1.router.weight", "ratios"):
        assert (routers[k] - source[k]).abs().max() > 1e-3, k  # the routers and the ratios trained
    # The schedule frozen from those ratios is the same table.
    tables = [json.loads((folder / "model" / "config.json").read_text())["wrappers"][0]["table"]
              for folder in (tmp_path / "one", two_runs / "route")]
    assert tables[0]["schedule"] == tables[1]["schedule"]
    for line in range(3):
        first = [json.loads((folder / "metrics.jsonl").read_text().splitlines()[line])
                 for folder in (tmp_path / "one", two_runs / "route")]
        for key in ("loss", "diffusion", "budget_loss", "kept_ratio", "macs_ratio"):
            assert first[0][key] == pytest.approx(first[1][key], rel=1e-5, abs=1e-9), (line, key)
    assert 0.4 < first[0]["kept_ratio"] < 0.8  # between bins, not dense


def test_two_processes_write_the_same_file_as_one_and_as_direct_generation(runs, tmp_path):
    inputs, two_runs = runs
    _main(sample_args(inputs, tmp_path / "one"))
    one, two = np.load(tmp_path / "one" / "samples.npz"), np.load(two_runs / "sample" / "samples.npz")
    assert one["arr_0"].shape == (10, 8, 8, 1) and one["arr_0"].dtype == np.uint8
    assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["arr_1"], two["arr_1"])
    model = leandit.load_model(inputs / "sampler")
    labels = make_labels(10, 10, "random", 0)
    torch.set_num_threads(1)
    direct = to_uint8_images(generate(model, labels, sampler="ddim", steps=4, seed=0, batch_size=10, progress=False), "pixel")
    assert np.array_equal(one["arr_0"], direct) and np.array_equal(one["arr_1"], labels.numpy())
    assert (tmp_path / "one" / "grid.png").exists()


def test_mar_learnable_pruning_on_two_processes_matches_one(runs, tmp_path):
    """3 steps of learnable 1:2 pruning (gates + LoRA on encoder and decoder blocks) of a MAR: one
    mask ratio per global batch, each process its half of the images, head rows and gate noise."""
    inputs, two_runs = runs
    _main(mar_prune_args(inputs, tmp_path / "one"))
    one = load_file(str(tmp_path / "one" / "checkpoints" / "step-0000003" / "model.safetensors"))
    two = load_file(str(two_runs / "mar-prune" / "checkpoints" / "step-0000003" / "model.safetensors"))
    assert one.keys() == two.keys() and any(k.startswith("backbone.decoder_blocks.") and "lora_B" in k for k in one)
    assert (one["gates.logits"] - 0.02).abs().max() > 1e-5  # the logits trained
    lora_b = [k for k in one if "lora_B" in k]
    assert max(one[k].abs().max().item() for k in lora_b) > 1e-4  # so did the adapters
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    first = [json.loads((folder / "metrics.jsonl").read_text().splitlines()[0]) for folder in (tmp_path / "one", two_runs / "mar-prune")]
    assert first[0]["loss"] == pytest.approx(first[1]["loss"], rel=1e-5)
    records = [json.loads((folder / "model" / "compression.json").read_text())[-1] for folder in (tmp_path / "one", two_runs / "mar-prune")]
    assert records[0]["kept_by_list"] == records[1]["kept_by_list"]


def test_mar_recovery_on_two_processes_matches_one(runs, tmp_path):
    inputs, two_runs = runs
    _main(mar_finetune_args(inputs, tmp_path / "one"))
    one = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    two = load_file(str(two_runs / "mar-finetune" / "model" / "model.safetensors"))
    start = load_file(str(inputs / "mar-student" / "model.safetensors"))
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 1e-4  # it trained
    for k in one:
        a, b = one[k], two[k]
        if k.endswith("attn.qkv.bias"):  # the key bias: rounding noise scaled up by Adam (see the DyDiT check)
            a, b = torch.cat(a.chunk(3)[::2]), torch.cat(b.chunk(3)[::2])
        assert (a - b).abs().max() < 1e-4, k  # Adam amplifies summation order
    history = json.loads((two_runs / "mar-finetune" / "model" / "compression.json").read_text())
    assert history[-1]["teacher_layers"] == [1, 3]  # encoder 1 -> its own end, decoder 0 -> the pair's end
    for line in range(3):
        first = [json.loads((folder / "metrics.jsonl").read_text().splitlines()[line])
                 for folder in (tmp_path / "one", two_runs / "mar-finetune")]
        for key in ("loss", "kd", "kd_kl", "diffusion", "repkd", "repkd_dropped"):
            assert first[0][key] == pytest.approx(first[1][key], rel=1e-5, abs=1e-9), (line, key)
