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


def test_width_slicing_equals_masking_the_removed_heads_and_channels():
    from leandit.models.width import slice_width
    from conftest import randomize_

    model = randomize_(tiny_model(depth=2, hidden_size=64, num_heads=4), std=0.1)
    narrow = slice_width(model, heads=2, mlp_hidden=100)
    assert narrow.blocks[0].attn.qkv.out_features == 3 * 32 and narrow.blocks[1].mlp.fc2.in_features == 100
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 50, 900]), torch.tensor([1, 2, 3])
    head_mask = torch.tensor([1.0, 1.0, 0.0, 0.0])
    channel_mask = (torch.arange(256) < 100).float()
    with torch.no_grad():
        tokens, c, _ = model.embed(x, t, y)
        for block in model.blocks:
            tokens = block(tokens, c, head_mask=head_mask, channel_mask=channel_mask)
        masked = model.unpatchify(model.final_layer(tokens, c))
        assert torch.allclose(narrow(x, t, y), masked, atol=1e-6)
    with pytest.raises(ValueError, match="keep 1..4 heads"):
        slice_width(model, 5, 10)


def test_curve_measures_depth_and_width_variants_and_draws_them(tmp_path, capsys):
    png, js = tmp_path / "curve.png", tmp_path / "curve.json"
    assert main(["bench", TINY + ",depth=4", "--curve", str(png), "--keep", "0.5", "--rounds", "2", "--warmup", "1",
                 "--batch-size", "2", "--json", str(js)]) == 0
    rows = json.loads(js.read_text())["rows"]
    assert [r["kind"] for r in rows] == ["full", "depth", "width"]
    assert rows[1]["depth"] == 2 and rows[2]["depth"] == 4
    assert rows[1]["compute_ratio"] == pytest.approx(rows[0]["flops_per_step"] / rows[1]["flops_per_step"])
    assert 1.5 < rows[1]["compute_ratio"] < 2.1 and 1.5 < rows[2]["compute_ratio"] < 2.1
    # Exactly: the first 2 of 4 blocks, and 1 of 2 heads with 64 of 128 MLP channels in every block.
    from leandit.models.width import slice_width

    full = open_spec(TINY + ",depth=4")
    assert rows[0]["flops_per_step"] % forward_flops(full, 1) == 0
    assert rows[1]["compute_ratio"] == pytest.approx(forward_flops(full, 1) / forward_flops(tiny_model(depth=2), 1), rel=1e-12)
    assert rows[2]["compute_ratio"] == pytest.approx(forward_flops(full, 1) / forward_flops(slice_width(full, 1, 64), 1), rel=1e-12)
    assert png.stat().st_size > 5000 and "share of the limit" in capsys.readouterr().out
    assert main(["bench", TINY, TINY, "--curve", str(png)]) == 2
    assert "exactly one MODEL" in capsys.readouterr().err
