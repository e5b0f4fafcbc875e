"""The `leandit` command as a user runs it: help, a train -> sample -> info round trip,
Ctrl-C and resume, and one-line errors with a non-zero exit for bad input."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import leandit
from leandit.cli import COMMANDS, build_parser, main

from conftest import ROOT, run_cli, tiny_model

TINY_SET = ["--set", "input_size=8", "--set", "in_channels=1", "--set", "hidden_size=32", "--set", "num_heads=2",
            "--set", "depth=2", "--set", "num_classes=10", "--set", "space=\"pixel\""]


def tiny_train_args(out, steps: int = 4, *extra: str) -> list[str]:
    return ["train", "--model", "DiT-S/2", *TINY_SET, "--data", "digits", "--steps", str(steps), "--batch-size", "16",
            "--lr", "1e-3", "--ema-decay", "0.9", "--checkpoint-every", "2", "--log-every", "1", "--device", "cpu",
            "--out", str(out), "--quiet", *extra]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_explains_each_option(command, capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    for action in sub._actions:
        assert action.help, f"leandit {command}: {action.option_strings or action.dest} has no help text"
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0 and "usage: leandit " + command in capsys.readouterr().out


@pytest.mark.slow  # three subprocesses, as a user runs them
def test_train_sample_info_round_trip_in_subprocesses(tmp_path):
    done = run_cli(*tiny_train_args(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    model_dir = tmp_path / "run" / "model"
    assert (model_dir / "config.json").exists() and (model_dir / "ema.safetensors").exists()
    run_record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run_record["settings"]["steps"] == 4 and run_record["model_config"]["depth"] == 2

    done = run_cli("sample", str(model_dir), "--out", str(tmp_path / "s"), "--num-samples", "12", "--steps", "4", "--quiet",
                   "--device", "cpu")
    assert done.returncode == 0, done.stderr
    with np.load(tmp_path / "s" / "samples.npz") as f:
        assert f["arr_0"].shape == (12, 8, 8, 1) and f["arr_0"].dtype == np.uint8
        assert f["arr_1"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert (tmp_path / "s" / "grid.png").exists()

    done = run_cli("info", str(model_dir), "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["architecture"]["depth"] == 2
    assert info["parameters"] == sum(p.numel() for p in leandit.load_model(model_dir).parameters())
    assert info["flops_per_forward"] == 2 * info["macs_per_forward"] > 0


@pytest.mark.slow  # a real process to interrupt, and three 60-step runs
def test_ctrl_c_saves_a_checkpoint_and_the_rerun_finishes_like_an_uninterrupted_run(tmp_path, capsys):
    args = tiny_train_args(tmp_path / "interrupted", 60)
    args[args.index("--checkpoint-every") + 1] = "1000"  # only Ctrl-C and the end save
    env = {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "leandit.cli", *args], cwd=ROOT, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "interrupted" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "checkpoint saved at step" in err
    saved = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert 3 <= saved < 60, "the run should have been stopped midway"
    assert (tmp_path / "interrupted" / "checkpoints" / f"step-{saved:07d}").is_dir()
    assert not (tmp_path / "interrupted" / "model").exists()

    # The rerun and the uninterrupted run in this process (only the Ctrl-C needs its own).
    capsys.readouterr()
    assert main(args) == 0  # the same command resumes
    assert "resuming from" in capsys.readouterr().err
    assert main(tiny_train_args(tmp_path / "straight", 60)) == 0
    a = load_file(str(tmp_path / "interrupted" / "model" / "ema.safetensors"))
    b = load_file(str(tmp_path / "straight" / "model" / "ema.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_recipe_file_and_command_line_precedence(tmp_path, capsys):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"model": "DiT-S/2", "model_overrides": {"input_size": 8, "in_channels": 1, "hidden_size": 32,
                                  "num_heads": 2, "depth": 1, "num_classes": 10, "space": "pixel"},
                                  "data": "digits", "steps": 99, "batch_size": 16, "device": "cpu"}))
    assert main(["train", "--recipe", str(recipe), "--steps", "1", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["settings"]["steps"] == 1 and record["settings"]["batch_size"] == 16
    assert record["model_config"]["depth"] == 1


def error_of(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    return err


def test_bad_input_gives_one_line_errors(tmp_path, capsys):
    bad_recipe = tmp_path / "bad.json"
    bad_recipe.write_text(json.dumps({"modle": "DiT-S/2"}))
    assert "unknown settings ['modle']" in error_of(["train", "--recipe", str(bad_recipe), "--out", str(tmp_path / "x")], capsys)
    assert "--steps is required" in error_of(["train", "--model", "DiT-S/2", "--data", "digits", "--out", str(tmp_path / "x")], capsys)
    err = error_of(["train", "--model", "DiT-S/2", "--space", "pixel", "--data", "digits", "--steps", "1", "--out", str(tmp_path / "x")], capsys)
    assert "shape (1, 8, 8)" in err and "(4, 32, 32)" in err
    assert "data not found" in error_of(["train", *tiny_train_args(tmp_path / "x")[1:], "--data", str(tmp_path / "nothing")], capsys)

    folder = tmp_path / "m"
    leandit.save_model(tiny_model(), folder)
    assert "named sizes only" in error_of(["train", "--model", str(folder), "--set", "depth=1", "--data", "digits", "--steps", "1",
                                           "--out", str(tmp_path / "x")], capsys)
    assert "model not found" in error_of(["sample", str(tmp_path / "missing"), "--out", str(tmp_path / "s")], capsys)
    assert "pass --vae" in error_of(["sample", "DiT-S/8", "--out", str(tmp_path / "s"), "--device", "cpu"], capsys)
    assert "does not fit a diffusion model" in error_of(["sample", str(folder), "--sampler", "heun", "--out", str(tmp_path / "s"),
                                                         "--device", "cpu", "--quiet"], capsys)
    assert "depth must be int, got 'abc'" in error_of(["train", *tiny_train_args(tmp_path / "x")[1:], "--set", "depth=abc"], capsys)
    assert "depth must be int, got 2.5" in error_of(["train", *tiny_train_args(tmp_path / "x")[1:], "--set", "depth=2.5"], capsys)
    assert "pixel space but the model is set up for latent" in error_of(
        ["train", "--model", "DiT-S/2", "--set", "input_size=8", "--set", "in_channels=1", "--data", "digits",
         "--steps", "1", "--out", str(tmp_path / "x")], capsys)
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in error_of(["sample", str(folder), "--device", "cuda", "--out", str(tmp_path / "s")], capsys)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert "is a file" in error_of([*tiny_train_args(a_file)], capsys)
    corrupt = tmp_path / "DiT-XL-2-256x256.pt"
    corrupt.write_bytes(b"PK\x03\x04 truncated download")
    assert "not a readable PyTorch checkpoint" in error_of(["info", str(corrupt)], capsys)
    assert not (tmp_path / "s").exists()  # nothing half-written by the failed commands
