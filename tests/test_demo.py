"""The demo's whole story with tiny settings (the DiT demo and the MAR one): every stage runs
through the real commands, the report has its table and grids, and a rerun reuses finished
stages."""

from __future__ import annotations

import json

import numpy as np
import pytest

from leandit.demo import DemoSettings, MarDemoSettings, mar_stage_names, run_demo, run_mar_demo
from leandit.evaluate.digits import class_agreement
from leandit.evaluate.digits_features import digits_as_uint8, load_digits_features
from leandit.evaluate.feature_nets import extract_features
from leandit.evaluate.metrics import all_metrics

TINY = DemoSettings(prune_steps=3, recover_steps=3, dynamic_steps=3, route_steps=3, batch_size=16, samples_per_class=3, sampling_steps=3,
                    bench_rounds=1, bench_trajectory=2)


@pytest.mark.slow  # every stage of the demo, run four times
def test_the_demo_prunes_recovers_measures_and_reports_then_reuses_its_stages(tmp_path, capsys):
    messages: list[str] = []
    report = run_demo(tmp_path / "demo", progress=False, log=messages.append, settings=TINY)
    text = report.read_text()
    for name in ("teacher", "learnable 1:2", "ShortGPT", "oracle", "DyDiT 0.5", "DiffCR 0.5"):
        assert f"| {name} |" in text
    assert "| ShortGPT | [0, 1, 2, 3, 4, 5] |" in text and "| oracle | [0, 2, 4, 7, 9, 11] |" in text
    for grid in ("teacher_grid.png", "learnable_grid.png", "shortgpt_grid.png", "oracle_grid.png", "dydit_grid.png", "diffcr_grid.png"):
        assert (tmp_path / "demo" / grid).stat().st_size > 500 and f"({grid})" in text
    state = json.loads((tmp_path / "demo" / "state.json").read_text())
    recovered = json.loads((tmp_path / "demo" / "recover-learnable" / "model" / "compression.json").read_text())
    assert [r["method"] for r in recovered] == ["learnable", "recovery"] and recovered[-1]["steps"] == 3
    speed = state["speed"]["result"]
    assert speed["teacher"]["speedup"] == 1.0 and speed["oracle"]["depth"] == 6
    # The dynamic model's FLOPs are counted from what it ran: at most the teacher's plus its routers.
    assert 0 < speed["DyDiT 0.5"]["flops_per_step"] <= 1.01 * speed["teacher"]["flops_per_step"]
    assert 0 < speed["DiffCR 0.5"]["flops_per_step"] <= 1.01 * speed["teacher"]["flops_per_step"]
    assert "| DiffCR 0.5 | all 12, on routed tokens |" in text
    routed = json.loads((tmp_path / "demo" / "route-diffcr" / "model" / "compression.json").read_text())
    assert [r["method"] for r in routed] == ["diffcr"] and routed[-1]["target"] == 0.5 and routed[-1]["training"]["budget"] == "macs"
    dynamic = json.loads((tmp_path / "demo" / "dynamic-dydit" / "model" / "compression.json").read_text())
    assert [r["method"] for r in dynamic] == ["dydit"] and dynamic[-1]["target"] == 0.5
    scored = state["sample-oracle-recovered"]["result"]
    assert scored["digits_fid"] >= 0
    # The numbers are those of the recovered model's samples against the embedded digits,
    # recomputed here from the sample file the stage wrote.
    with np.load(tmp_path / "demo" / "oracle_samples.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (30, 8, 8, 1) and labels.tolist() == [i % 10 for i in range(30)] and scored["samples"] == 30
    net = load_digits_features()
    expected = all_metrics(extract_features(net, images, progress=False), extract_features(net, digits_as_uint8()[0], progress=False))
    for key, value in expected.items():
        assert scored[f"digits_{key}"] == pytest.approx(value, rel=1e-6, abs=1e-9), key  # float32 features: summation order
    assert f"| {expected['fid']:.2f} |" in text
    messages.clear()
    run_demo(tmp_path / "demo", progress=False, log=messages.append, settings=TINY)
    assert not any("running" in m for m in messages) and any("reusing" in m for m in messages)
    messages.clear()
    run_demo(tmp_path / "demo", progress=False, log=messages.append, settings=TINY, redo={"speed"})
    assert [m for m in messages if "running" in m] == ["[speed] running ..."]
    # Redoing a recovery trains it afresh (not resumed from its old checkpoints) and reruns
    # the stages that use its model.
    before = (tmp_path / "demo" / "recover-oracle" / "model" / "model.safetensors").stat().st_mtime_ns
    messages.clear()
    capsys.readouterr()
    run_demo(tmp_path / "demo", progress=False, log=messages.append, settings=TINY, redo={"recover-oracle"})
    assert [m for m in messages if "running" in m] == ["[recover-oracle] running ...", "[sample-oracle-recovered] running ...",
                                                      "[speed] running ..."]
    assert (tmp_path / "demo" / "recover-oracle" / "model" / "model.safetensors").stat().st_mtime_ns != before
    assert "resuming" not in capsys.readouterr().err  # the loop announces a resume on stderr


MAR_TINY = MarDemoSettings(prune_steps=3, recover_steps=3, batch_size=16, samples_per_class=2, num_iter=4, head_steps="ddim10")


def test_the_mar_demo_prunes_both_lists_recovers_scores_and_reports_then_reuses_its_stages(tmp_path):
    messages: list[str] = []
    report = run_mar_demo(tmp_path / "mar", progress=False, log=messages.append, settings=MAR_TINY)
    text = report.read_text()
    for name in ("teacher", "learnable 1:2", "ShortGPT"):
        assert f"| {name} |" in text
    assert "| teacher | all 12 | 6 + 6 |" in text
    for grid in ("teacher_grid.png", "learnable_grid.png", "shortgpt_grid.png"):
        assert (tmp_path / "mar" / grid).stat().st_size > 500 and f"({grid})" in text
    state = json.loads((tmp_path / "mar" / "state.json").read_text())
    assert list(state) == mar_stage_names()
    recovered = json.loads((tmp_path / "mar" / "recover-learnable" / "model" / "compression.json").read_text())
    assert [r["method"] for r in recovered] == ["learnable", "recovery"] and recovered[-1]["steps"] == 3
    assert recovered[-1]["loss"]["mix"] == "masked-kd"
    kept = state["prune-learnable"]["result"]["kept"]
    assert len(kept) == 6 and all(k // 2 == i for i, k in enumerate(kept))  # one of every pair (1:2)
    assert f"| learnable 1:2 | {kept} | 3 + 3 |" in text
    scored = state["sample-shortgpt-recovered"]["result"]
    # The numbers are those of the recovered model's samples, recomputed from the file the stage wrote.
    with np.load(tmp_path / "mar" / "shortgpt_samples.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (20, 8, 8, 1) and labels.tolist() == [i % 10 for i in range(20)] and scored["samples"] == 20
    net = load_digits_features()
    expected = all_metrics(extract_features(net, images, progress=False), extract_features(net, digits_as_uint8()[0], progress=False))
    assert scored["digits_fid"] == pytest.approx(expected["fid"], rel=1e-6) and f"| {expected['fid']:.2f} |" in text
    agreement = class_agreement(images[..., 0].astype(np.float32) / 255 * 16, labels)
    assert scored["class_agreement"] == pytest.approx(agreement, abs=0.051)  # uint8 rounding may move one sample
    # Half the blocks: the blocks' MACs of a generation halve; the head's stay.
    teacher_macs = state["sample-teacher"]["result"]["macs"]
    assert 2 * scored["macs"]["blocks"] == teacher_macs["blocks"] and scored["macs"]["head"] == teacher_macs["head"]
    messages.clear()
    run_mar_demo(tmp_path / "mar", progress=False, log=messages.append, settings=MAR_TINY)
    assert not any("running" in m for m in messages) and any("reusing" in m for m in messages)
    messages.clear()
    run_mar_demo(tmp_path / "mar", progress=False, log=messages.append, settings=MAR_TINY, redo={"recover-shortgpt"})
    assert [m for m in messages if "running" in m] == ["[recover-shortgpt] running ...", "[sample-shortgpt-recovered] running ..."]


def test_the_mar_demo_command_checks_its_stages_and_each_demo_keeps_out_of_the_others_folder(tmp_path, capsys):
    from leandit.cli import main

    assert main(["demo", "--backbone", "mar", "--redo", "speed", "--out", str(tmp_path / "x")]) == 2
    assert "--redo speed: no such stage; the stages are teacher, sample-teacher, prune-learnable" in capsys.readouterr().err
    dit = tmp_path / "dit"
    dit.mkdir()
    (dit / "state.json").write_text(json.dumps({"teacher": {"settings": {}, "result": {"family": "DiT"}, "finished": "x"}}))
    with pytest.raises(ValueError, match="holds the DiT demo's results"):
        run_mar_demo(dit, progress=False, log=lambda m: None, settings=MAR_TINY)
    mar = tmp_path / "mar"
    mar.mkdir()
    (mar / "state.json").write_text(json.dumps({"teacher": {"settings": {}, "result": {"family": "MAR"}, "finished": "x"}}))
    with pytest.raises(ValueError, match="holds the MAR demo's results"):
        run_demo(mar, progress=False, log=lambda m: None, settings=TINY)
    assert sorted(p.name for p in mar.iterdir()) == ["state.json"]  # refused before any work
