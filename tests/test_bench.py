"""`leandit bench`: model specs, the side-by-side measurement, and the command."""

from __future__ import annotations

import json

import pytest
import torch

import leandit
from leandit.cli import main
from leandit.evaluate.model_specs import open_spec, parse_spec
from leandit.evaluate.speed import measure_speed, process_peak_memory_mib
from leandit.models.flops import forward_flops
from conftest import tiny_model

TINY = "DiT-S/2:input_size=8,in_channels=1,hidden_size=32,num_heads=2,num_classes=10,space=\"pixel\""


def test_specs_name_sizes_with_overrides_or_paths():
    assert parse_spec("DiT-XL/2:depth=14") == ("DiT-XL/2", {"depth": 14})
    assert parse_spec("runs/x/model") == ("runs/x/model", {})
    model = open_spec(TINY + ",depth=3")
    assert model.config.depth == 3 and model.config.hidden_size == 32
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        parse_spec("DiT-XL/2:depth")
    with pytest.raises(FileNotFoundError, match="named size such as"):
        open_spec("no/such/model")


def test_measurement_counts_the_guided_batch_and_relates_latencies_to_the_first():
    deep, shallow = tiny_model(depth=4), tiny_model(depth=2)
    results = measure_speed([("deep", deep), ("shallow", shallow)], 3, cfg_scale=1.5, sampling_steps=50, warmup=1, rounds=3)
    assert [r.depth for r in results] == [4, 2]
    assert results[0].flops_per_step == forward_flops(deep, 6)  # guidance runs 2 x batch
    assert results[1].parameters == sum(p.numel() for p in shallow.parameters())
    assert results[0].speedup == 1.0
    assert results[1].speedup == pytest.approx(results[0].latency_ms / results[1].latency_ms)
    assert results[1].images_per_s == pytest.approx(3 / (results[1].latency_ms / 1e3 * 50))
    unguided = measure_speed([("deep", deep)], 3, cfg_scale=1.0, warmup=0, rounds=1)
    assert unguided[0].flops_per_step == forward_flops(deep, 3)


def test_cpu_peak_memory_of_a_step_grows_with_the_batch():
    small = process_peak_memory_mib("DiT-S/2:depth=2", 1, 1.0, "fp32")
    large = process_peak_memory_mib("DiT-S/2:depth=2", 64, 1.0, "fp32")
    weights = sum(p.numel() for p in open_spec("DiT-S/2:depth=2").parameters()) * 4 / 2**20
    assert weights < small < large


def test_bench_command_prints_and_writes_the_table(tmp_path, capsys):
    folder = tmp_path / "model"
    leandit.save_model(tiny_model(depth=2), folder)
    out, js = tmp_path / "bench.md", tmp_path / "bench.json"
    assert main(["bench", TINY + ",depth=4", str(folder), "--batch-size", "2", "--rounds", "2", "--warmup", "1",
                 "--out", str(out), "--json", str(js), "--no-memory"]) == 0
    printed = capsys.readouterr().out
    assert "| model | blocks |" in printed and str(folder) in printed
    rows = json.loads(js.read_text())["rows"]
    assert [r["depth"] for r in rows] == [4, 2] and rows[0]["speedup"] == 1.0
    assert out.read_text().startswith("Machine: ") and "speed-up" in out.read_text()
    assert main(["bench", "DiT-S/2:depth", "--rounds", "1"]) == 2
    assert "FIELD=VALUE" in capsys.readouterr().err
