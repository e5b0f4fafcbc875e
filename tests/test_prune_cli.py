"""`leandit prune` and `leandit analyze calibration` run as a user runs them."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

import leandit

from leandit.cli import main
from conftest import randomize_, run_cli, tiny_model

LEARN = ["--method", "learnable", "--scheme", "1:2", "--batch-size", "16", "--log-every", "1", "--checkpoint-every", "3",
         "--device", "cpu", "--precision", "fp32", "--lr", "1e-3", "--quiet"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("source") / "teacher"
    leandit.save_model(randomize_(tiny_model(depth=4), std=0.15), folder)
    return folder


def _ok(done):
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _main(*argv: str) -> None:
    """In-process, for the many cheap calls (a subprocess costs seconds of imports)."""
    assert main(list(argv)) == 0


def test_learnable_run_exports_a_shallower_model_and_resumes_exactly(source, tmp_path):
    straight = tmp_path / "straight"
    done = _ok(run_cli("prune", str(source), *LEARN, "--steps", "6", "--out", str(straight)))
    assert "pruned model written to" in done.stderr
    model = leandit.load_model(straight / "model")
    assert model.config.depth == 2
    record = json.loads((straight / "model" / "compression.json").read_text())[-1]
    assert record["method"] == "learnable" and record["scheme"] == "1:2" and record["steps"] == 6
    assert record["source"] == str(source) and len(record["groups"]) == 2
    assert all(0.5 <= g["confidence"] <= 1 for g in record["groups"]) and record["decided_by"] == "ema_logits"
    assert (straight / "decisions.png").stat().st_size > 1000
    lines = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and "keep_prob/003" in lines[0] and "confidence/001" in lines[-1]
    assert lines[0]["temperature"] == pytest.approx(4.0) and lines[-1]["temperature"] == pytest.approx(0.1)

    resumed = tmp_path / "resumed"
    _main("prune", str(source), *LEARN, "--steps", "6", "--out", str(resumed), "--stop-after", "4")
    assert not (resumed / "model").exists()
    _main("prune", str(source), *LEARN, "--steps", "6", "--out", str(resumed), "--merge-delta")
    a = load_file(str(straight / "checkpoints" / "step-0000006" / "ema.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "step-0000006" / "ema.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "gates.logits" in a and any("lora_A" in k for k in a)
    merged = json.loads((resumed / "model" / "compression.json").read_text())[-1]
    assert merged["weights"] == "lora-merged" and merged["kept_indices"] == record["kept_indices"]
    plain, delta = leandit.load_model(straight / "model"), leandit.load_model(resumed / "model")
    assert not torch.equal(plain.blocks[0].mlp.fc1.weight, delta.blocks[0].mlp.fc1.weight)


@pytest.mark.parametrize(
    "method, extra, depth",
    [
        ("shortgpt", ["--keep", "3"], 3),
        ("fluxlite", ["--scheme", "1:2"], 2),
        ("sensitivity", ["--scheme", "1:2,2:2"], 3),
        ("oracle", ["--keep", "2"], 2),
        ("random", ["--scheme", "1:2", "--random-pick", "median-loss", "--random-samples", "5"], 2),
        ("indices", ["--indices", "0,3"], 2),
    ],
)
def test_every_baseline_writes_a_loadable_model(method, extra, depth, source, tmp_path):
    out = tmp_path / method
    _main("prune", str(source), "--method", method, *extra, "--calibration-size", "16", "--out", str(out), "--quiet")
    model = leandit.load_model(out / "model")
    assert model.config.depth == depth
    decision = json.loads((out / "decision.json").read_text())
    assert decision["method"].startswith(method) and len(decision["kept_indices"]) == depth
    if method in ("shortgpt", "fluxlite", "sensitivity"):
        assert len(decision["scores"]) == 4 and decision["calibration"]["size"] == 16


def test_analyze_calibration_writes_histogram_and_numbers(source, tmp_path):
    pruned = tmp_path / "pruned"
    _main("prune", str(source), "--method", "indices", "--indices", "1,2", "--out", str(pruned), "--quiet")
    out = tmp_path / "analysis"
    done = _ok(run_cli("analyze", "calibration", str(source), "--keep", "2", "--samples", "25", "--calibration-size", "16",
                       "--mark", f"mine={pruned / 'model'}", "--out", str(out), "--quiet"))
    assert "random masks: min" in done.stdout  # a result: on stdout, so that `> file` keeps it
    rows = list(csv.DictReader(open(out / "calibration_losses.csv")))
    kinds = [r["kind"] for r in rows]
    assert kinds.count("random") == 25 and kinds.count("baseline") == 4 and kinds.count("marked") == 1
    mine = next(r for r in rows if r["name"] == "mine")
    assert mine["kept_indices"] == "1 2"
    same = [r for r in rows if r["kind"] == "random" and r["kept_indices"] == "1 2"]
    assert all(r["calibration_loss"] == mine["calibration_loss"] for r in same)  # one loss function for all
    assert (out / "calibration_histogram.png").stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 25 and summary["distinct"] <= 6


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "learnable", "--scheme", "1:3", "--steps", "2"], "scheme 1:3 does not fit a depth of 4"),
        (["--method", "learnable", "--scheme", "1:2"], "learnable pruning needs --steps"),
        (["--method", "shortgpt"], "needs --scheme (e.g. 1:2) or --keep K"),
        (["--method", "indices", "--indices", "0,9"], "out of range"),
        (["--method", "learnable", "--steps", "2"], "learnable pruning needs a local --scheme"),
        (["--method", "oracle", "--keep", "2", "--merge-delta"], "--merge-delta applies to --method learnable only"),
        (["--method", "shortgpt", "--keep", "2", "--steps", "5"], "--steps applies to --method learnable only"),
        (["--method", "oracle", "--keep", "2", "--indices", "0,1"], "--indices applies to --method indices only"),
        (["--method", "random", "--keep", "2", "--random-samples", "5"], "--random-samples applies to --method random with"),
        (["--method", "random", "--keep", "2", "--random-pick", "min-loss", "--random-samples", "0"], "must be at least 1"),
        (["--method", "learnable", "--scheme", "1:2", "--steps", "2", "--recoverability", "frozen", "--merge-delta"],
         "nothing to merge"),
        (["--method", "learnable", "--scheme", "1:2", "--steps", "0", "--ema-decay", "0.9"], "--steps must be at least 1"),
        (["--method", "learnable", "--scheme", "1:2", "--steps", "2", "--grad-clip", "-1"], "gradient clip must be a positive norm"),
        (["--method", "shortgpt", "--keep", "2", "--eval-batch-size", "0"], "must be at least 1"),
    ],
)
def test_bad_requests_fail_with_one_line_and_write_no_model(args, message, source, tmp_path, capsys):
    assert main(["prune", str(source), *args, "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out" / "model").exists()


def test_missing_model_and_unpruned_mark_are_named(source, tmp_path):
    done = run_cli("prune", str(tmp_path / "nope"), "--method", "oracle", "--keep", "2", "--out", str(tmp_path / "o"))
    assert done.returncode == 2 and "model not found" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert main(["analyze", "calibration", str(source), "--keep", "2", "--mark", f"x={source}", "--out", str(tmp_path / "a")]) == 2
