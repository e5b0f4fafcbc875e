"""`leandit dynamic` end to end on the shipped digits teacher: a few steps make a dynamic model
folder that `info`, `sample` and `bench --trajectory` take; a stopped run resumes to the
uninterrupted run's weights; refused inputs are one-line errors that leave no --out folder.

Commands run through `leandit.cli.main` in this process (what `python -m leandit.cli` runs,
without a new interpreter's start-up for each)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import leandit
from leandit.cli import main
from leandit.compress.dynamic import DynamicModel
from test_new_user import error_of  # the one-line error of a refused command

RUN = ["--batch-size", "16", "--device", "cpu", "--precision", "fp32", "--log-every", "1", "--quiet"]
FILES = ("model.safetensors", "ema.safetensors", "wrapper-0-dydit.safetensors")


def dynamic(out, *extra: str, steps: int = 4, target: str = "0.6") -> list[str]:
    return ["dynamic", "digits-teacher", "--target", target, "--steps", str(steps), "--out", str(out), *RUN, *extra]




@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """4 steps toward 0.6 of the MACs; the same run stopped after 2 steps."""
    root = tmp_path_factory.mktemp("dynamic")
    assert main(dynamic(root / "run")) == 0
    assert main(dynamic(root / "stopped", "--stop-after", "2")) == 0
    assert (root / "stopped" / "checkpoints" / "step-0000002").is_dir()
    assert not (root / "stopped" / "model").exists()  # stopped: no final model yet
    return root


def same_files(a, b) -> None:
    for name in FILES:
        first, second = load_file(str(a / name)), load_file(str(b / name))
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first), name


def test_the_run_writes_a_dynamic_model_folder_that_trained(run):
    folder = run / "run" / "model"
    assert all((folder / name).exists() for name in FILES)
    model = leandit.load_model(folder)
    assert isinstance(model, DynamicModel) and model.settings.width and model.settings.tokens
    metrics = [json.loads(line) for line in (run / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["target"] == pytest.approx(0.6) and 0 < m["macs_ratio"] for m in metrics)
    assert metrics[-1]["macs_ratio"] < metrics[0]["macs_ratio"]  # the MAC loss moved the routers
    # The routers left their fresh state and the backbone its teacher weights.
    fresh = DynamicModel(leandit.load_model("digits-teacher"))
    raw = leandit.load_model(folder, weights="model")
    assert not torch.equal(raw.dynamic_blocks[0].width_routers.heads.bias, fresh.dynamic_blocks[0].width_routers.heads.bias)
    assert not torch.equal(raw.backbone.blocks[0].attn.qkv.weight, fresh.backbone.blocks[0].attn.qkv.weight)
    record = json.loads((folder / "compression.json").read_text())[-1]
    assert record["method"] == "dydit" and record["target"] == 0.6 and record["steps"] == 4


def test_the_same_command_gives_the_same_model(run, tmp_path):
    """The token routers' first layer starts random: it must come from --seed, not from
    whatever the global generator holds."""
    torch.manual_seed(12345)
    assert main(dynamic(tmp_path / "again")) == 0
    same_files(run / "run" / "model", tmp_path / "again" / "model")


def test_a_stopped_and_resumed_run_equals_the_uninterrupted_one(run, tmp_path):
    import shutil

    resumed = shutil.copytree(run / "stopped", tmp_path / "resumed")
    assert main(dynamic(resumed)) == 0
    same_files(run / "run" / "model", resumed / "model")
    lines = lambda folder: [{k: v for k, v in json.loads(line).items() if k not in ("steps_per_s", "images_per_s")}  # noqa: E731
                            for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert lines(run / "run") == lines(resumed)


def test_resuming_with_another_target_is_refused(run, capsys):
    err = error_of(dynamic(run / "stopped", target="0.5"), capsys)
    assert "target" in err and "resume" in err.lower(), err
    assert not (run / "stopped" / "model").exists()


def test_info_shows_the_dynamic_model(run, capsys):
    capsys.readouterr()
    assert main(["info", str(run / "run" / "model")]) == 0
    out = capsys.readouterr().out
    assert "DyDiT (TDW+SDT)" in out and "mean heads per block (of 4)" in out and "mean MLP groups per block" in out
    assert "dydit: target 0.6" in out


def test_sample_takes_the_dynamic_model_as_any_model(run, tmp_path):
    from leandit.evaluate.sampling import generate, make_labels, to_uint8_images

    out = tmp_path / "samples"
    argv = ["sample", str(run / "run" / "model"), "--steps", "2", "--num-samples", "4", "--part-size", "4",
            "--batch-size", "4", "--labels", "random", "--device", "cpu", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    samples = np.load(out / "samples.npz")
    assert samples["arr_0"].shape == (4, 8, 8, 1)
    model = leandit.load_model(run / "run" / "model")
    labels = make_labels(4, 10, "random", 0)
    direct = to_uint8_images(generate(model, labels, steps=2, seed=0, batch_size=4, progress=False), "pixel")
    assert np.array_equal(samples["arr_0"], direct)


def test_bench_times_dynamic_models_over_a_trajectory_only(run, capsys):
    model = str(run / "run" / "model")
    bench = ["bench", "digits-teacher", model, "--batch-size", "4", "--rounds", "1", "--warmup", "0", "--no-memory", "--device", "cpu"]
    capsys.readouterr()
    assert main([*bench, "--trajectory", "3"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("|")]
    assert len(rows) == 4 and model in rows[3], out  # header, rule, dense, dynamic
    flops = [float(row.split("|")[4].split()[0]) for row in rows[2:]]  # FLOPs / step, counted from the decisions
    assert flops[1] < flops[0]
    assert "3-step sampling run" in out
    capsys.readouterr()
    assert main(bench) == 2
    # (bench logs "measuring 2 models ..." to stderr before it refuses: the error is the last line)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("leandit bench: error:") and "--trajectory" in err


# -- refused inputs: one line, exit 2, no --out folder --------------------------------------

@pytest.mark.parametrize("target", ["0", "1.5", "nan", "-0.1"])
def test_a_target_outside_zero_to_one_is_refused_before_any_work(tmp_path, capsys, target):
    err = error_of(dynamic(tmp_path / "out", target=target), capsys)
    assert "(0, 1]" in err
    assert not (tmp_path / "out").exists()


def test_a_target_below_the_models_floor_is_refused(tmp_path, capsys):
    err = error_of(dynamic(tmp_path / "out", target="0.05"), capsys)
    assert "below what this model can reach" in err
    assert not (tmp_path / "out").exists()


def test_a_target_warmup_longer_than_the_run_is_refused(tmp_path, capsys):
    err = error_of(dynamic(tmp_path / "out", "--target-warmup", "10"), capsys)
    assert "--target-warmup 10" in err
    assert not (tmp_path / "out").exists()


def test_a_model_without_a_timestep_embedding_is_refused_with_dynamic_width(tmp_path, capsys, monkeypatch):
    from diffusers_models import tiny_diffusers_dit
    from test_dynamic import without_timestep_embedding

    without_timestep_embedding(monkeypatch)

    source = leandit.save_model(tiny_diffusers_dit(depth=2), tmp_path / "diffusers")
    argv = ["dynamic", str(source), "--target", "0.6", "--steps", "2", "--out", str(tmp_path / "out"), *RUN]
    err = error_of(argv, capsys)
    assert "timestep embedding" in err
    assert not (tmp_path / "out").exists()


def test_a_corrupt_router_file_is_refused_in_one_line(run, tmp_path, capsys):
    import shutil

    folder = shutil.copytree(run / "run" / "model", tmp_path / "model")
    routers = folder / "wrapper-0-dydit.safetensors"
    routers.write_bytes(routers.read_bytes()[:100])
    err = error_of(["info", str(folder)], capsys)
    assert "wrapper-0-dydit.safetensors" in err
    err = error_of(["sample", str(folder), "--num-samples", "2", "--out", str(tmp_path / "samples"), "--device", "cpu"], capsys)
    assert "wrapper-0-dydit.safetensors" in err
    assert not (tmp_path / "samples").exists()


def test_a_depth_pruned_model_made_dynamic_and_distilled_keeps_both_steps(tmp_path):
    """Depth pruning then DyDiT: the record keeps both steps, and masked KD from the unpruned
    teacher aligns each kept block with the teacher block it stands for."""
    pruned = tmp_path / "pruned"
    assert main(["prune", "digits-teacher", "--method", "oracle", "--keep", "6", "--out", str(pruned), "--quiet"]) == 0
    out = tmp_path / "dynamic"
    argv = ["dynamic", str(pruned / "model"), "--target", "0.7", "--steps", "2", "--out", str(out), "--mix", "masked-kd",
            "--teacher", "digits-teacher", *RUN]
    assert main(argv) == 0
    history = json.loads((out / "model" / "compression.json").read_text())
    assert [r["method"] for r in history] == ["oracle", "dydit"]
    assert history[-1]["loss"]["mix"] == "masked-kd" and history[-1]["loss"]["teacher"] == "digits-teacher"
    model = leandit.load_model(out / "model")
    assert isinstance(model, DynamicModel) and model.depth == 6


def test_analyze_widths_plots_and_tables_what_each_block_runs(run, tmp_path, capsys):
    out = tmp_path / "widths"
    capsys.readouterr()
    assert main(["analyze", "widths", str(run / "run" / "model"), "--out", str(out), "--calibration-size", "32"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 + 12 and printed[1].split()[0] == "0"  # a header and one line per block
    rows = (out / "widths.csv").read_text().splitlines()
    assert rows[0] == "block,timestep,heads,groups" and len(rows) == 1 + 12 * 1000
    model = leandit.load_model(run / "run" / "model")
    heads = [int(r.split(",")[2]) for r in rows[1:1001]]  # block 0 over t = 0..999
    mask = model.width_table()["heads"][0]
    assert heads == [bin(m).count("1") for m in mask]
    assert (out / "widths.png").stat().st_size > 5000
    err = error_of(["analyze", "widths", "digits-teacher", "--out", str(tmp_path / "dense")], capsys)
    assert "not dynamic" in err and not (tmp_path / "dense").exists()
