"""`leandit route` end to end, as a user runs it: a few steps on the digits teacher make a
routed model folder that `info`, `sample` and `bench --trajectory` take; a stopped run
resumes to the uninterrupted run's weights; a changed option on resume is refused; a
depth-pruned model routes and keeps both steps in its record; diffusers DiT folders route
from the command line and PixArt through the same loop; refused inputs are one-line errors
that leave no --out folder.

Commands run through `leandit.cli.main` in this process. Every command that opens a routed
model measures its blocks' MACs (about a second for the 12-block teacher), so the runs are
shared by the module."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import leandit
from leandit.cli import main
from leandit.compress.routing import RoutedModel, RoutingSettings
from test_new_user import error_of  # the one-line error of a refused command

from conftest import randomize_, tiny_model

RUN = ["--batch-size", "16", "--device", "cpu", "--precision", "fp32", "--log-every", "1", "--quiet"]
FILES = ("model.safetensors", "ema.safetensors", "wrapper-0-diffcr.safetensors")


def route(model, out, *extra: str, steps: int = 4, target: str = "0.5") -> list[str]:
    return ["route", str(model), "--target", target, "--steps", str(steps), "--out", str(out), *RUN, *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """4 steps on the digits teacher toward 50 % fewer block tokens."""
    root = tmp_path_factory.mktemp("route")
    assert main(route("digits-teacher", root / "run")) == 0
    return root


@pytest.fixture(scope="module")
def loaded(run) -> RoutedModel:
    """The run's model as load_model gives it (EMA weights), opened once."""
    return leandit.load_model(run / "run" / "model")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A 2-block random DiT folder (cheap to route for the refusals that open a model)."""
    folder = tmp_path_factory.mktemp("tiny") / "model"
    return leandit.save_model(randomize_(tiny_model(hidden_size=32, num_heads=4, depth=2), std=0.2), folder)


def same_files(a, b) -> None:
    for name in FILES:
        first, second = load_file(str(a / name)), load_file(str(b / name))
        assert first.keys() == second.keys(), name
        assert all(torch.equal(first[k], second[k]) for k in first), name


def test_the_run_writes_a_frozen_routed_model_that_trained(run, loaded):
    folder = run / "run" / "model"
    assert all((folder / name).exists() for name in FILES)
    model = loaded  # the EMA weights, routers and ratios included
    assert isinstance(model, RoutedModel) and model.settings == RoutingSettings()
    assert model.schedule is not None and model.schedule.shape == (12, 4)
    assert torch.equal(model.schedule, model.hard_schedule())  # the stored schedule is these ratios' nearest bins
    assert (model.schedule < 16).any()
    raw = load_file(str(folder / "wrapper-0-diffcr.safetensors"))["ratios"]  # the trained (not EMA) ratios
    # Router lr auto = 0.1: the ratios moved (within the projection's range); the EMA's lag behind.
    assert raw.shape == (12, 4) and raw.max() <= 1 and raw.min() >= 0.1 and raw.mean() < 0.85
    assert (model.ratios.detach() > raw).sum() > 40
    teacher = leandit.load_model("digits-teacher").state_dict()
    weights = load_file(str(folder / "model.safetensors"))
    assert weights.keys() == teacher.keys()  # the backbone's file: a plain DiT's
    assert not torch.equal(weights["blocks.0.attn.qkv.weight"], teacher["blocks.0.attn.qkv.weight"])
    metrics = [json.loads(line) for line in (run / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["budget_loss"] == pytest.approx((m["kept_ratio"] - 0.5) ** 2, rel=1e-4) for m in metrics)
    assert metrics[0]["kept_ratio"] == pytest.approx(1.0) and metrics[-1]["kept_ratio"] < 0.9
    assert metrics[-1]["macs_ratio"] < metrics[0]["macs_ratio"]
    record = json.loads((folder / "compression.json").read_text())[-1]
    assert record["method"] == "diffcr" and record["target"] == 0.5 and record["steps"] == 4
    assert record["training"]["budget"] == "ratio" and record["source"] == "digits-teacher"


@pytest.fixture(scope="module")
def tiny_runs(tiny_folder, tmp_path_factory):
    """On the 2-block model (cheap to open): 4 steps, and the same run stopped after 2."""
    root = tmp_path_factory.mktemp("tiny-runs")
    extra = ("--regions", "2", "--router-lr", "0.05")
    assert main(route(tiny_folder, root / "run", *extra)) == 0
    assert main(route(tiny_folder, root / "stopped", *extra, "--stop-after", "2")) == 0
    assert (root / "stopped" / "checkpoints" / "step-0000002").is_dir()
    assert not (root / "stopped" / "model").exists()
    return root, extra


def test_a_stopped_and_resumed_run_equals_the_uninterrupted_one(tiny_folder, tiny_runs, tmp_path):
    root, extra = tiny_runs
    resumed = shutil.copytree(root / "stopped", tmp_path / "resumed")
    assert main(route(tiny_folder, resumed, *extra)) == 0
    same_files(root / "run" / "model", resumed / "model")
    lines = lambda folder: [{k: v for k, v in json.loads(line).items() if k not in ("steps_per_s", "images_per_s")}  # noqa: E731
                            for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert lines(root / "run") == lines(resumed) and len(lines(resumed)) == 4
    a = json.loads((root / "run" / "model" / "config.json").read_text())["wrappers"]
    b = json.loads((resumed / "model" / "config.json").read_text())["wrappers"]
    assert a == b  # the same schedule table
    ratios = load_file(str(resumed / "model" / "wrapper-0-diffcr.safetensors"))["ratios"]
    assert ratios.shape == (2, 2) and (ratios < 1).all()  # it trained


@pytest.mark.parametrize("change", [("--scale", "update"), ("--target", "0.4"), ("--bins", "8")])
def test_resuming_with_another_option_is_refused(tiny_folder, tiny_runs, capsys, change):
    root, extra = tiny_runs
    err = error_of(route(tiny_folder, root / "stopped", *extra, *change), capsys)
    assert "resume" in err.lower(), err
    assert change[0].removeprefix("--") in err, err
    assert not (root / "stopped" / "model").exists()


def test_info_shows_the_routing_lines_and_the_compression_chain(run, loaded, capsys):
    folder = run / "run" / "model"
    capsys.readouterr()
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    summary = loaded.summary()
    assert lines["routing"].startswith(f"routing     DiffCR token routing, {summary['macs_ratio']:.1%} of the MACs on average "
                                       "over 4 timestep regions")
    assert "scale mlp, straight-through multiplier" in lines["routing"]
    kept = ", ".join(f"{v:g}" for v in summary["mean_kept_per_layer"])
    assert lines["tokens"] == f"tokens      mean kept tokens per block (of 16): {kept}"
    assert "compression 1. diffcr: 50% fewer block tokens targeted (4 steps, --mix plain) from digits-teacher" in out


def test_sample_takes_the_routed_model_and_equals_direct_generation(run, loaded, tmp_path):
    from leandit.evaluate.sampling import generate, make_labels, to_uint8_images

    out = tmp_path / "samples"
    argv = ["sample", str(run / "run" / "model"), "--steps", "2", "--num-samples", "4", "--part-size", "4",
            "--batch-size", "4", "--labels", "random", "--device", "cpu", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    samples = np.load(out / "samples.npz")
    assert samples["arr_0"].shape == (4, 8, 8, 1)
    labels = make_labels(4, 10, "random", 0)
    direct = to_uint8_images(generate(loaded, labels, steps=2, seed=0, batch_size=4, progress=False), "pixel")
    assert np.array_equal(samples["arr_0"], direct)


def test_bench_counts_the_routed_model_over_a_trajectory(run, capsys):
    model = str(run / "run" / "model")
    bench = ["bench", "digits-teacher", model, "--batch-size", "2", "--rounds", "1", "--warmup", "0", "--no-memory",
             "--device", "cpu", "--trajectory", "2"]
    capsys.readouterr()
    assert main(bench) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("|")]
    assert len(rows) == 4 and model in rows[3], out  # header, rule, dense, routed
    flops = [float(row.split("|")[4].split()[0]) for row in rows[2:]]
    assert 0 < flops[1] < flops[0]  # fewer FLOPs per step than the dense teacher
    assert "2-step sampling run" in out


def test_a_depth_pruned_model_routes_and_keeps_both_steps(tmp_path, capsys):
    pruned = tmp_path / "pruned"
    assert main(["prune", "digits-teacher", "--method", "shortgpt", "--keep", "6", "--calibration-size", "16",
                 "--out", str(pruned), "--quiet"]) == 0
    out = tmp_path / "routed"
    assert main(route(pruned / "model", out, "--regions", "2", steps=2, target="0.3")) == 0
    table = json.loads((out / "model" / "config.json").read_text())["wrappers"][0]["table"]
    assert len(table["schedule"]) == 6 and all(len(row) == 2 for row in table["schedule"])
    history = json.loads((out / "model" / "compression.json").read_text())
    assert [r["method"] for r in history] == ["shortgpt", "diffcr"]
    capsys.readouterr()
    assert main(["info", str(out / "model")]) == 0
    printed = capsys.readouterr().out
    assert "compression 1. shortgpt: kept 6 of 12 blocks" in printed and "compression 2. diffcr: 30% fewer" in printed
    assert "routing     DiffCR token routing" in printed and "over 2 timestep regions" in printed
    kept = history[0]["kept_indices"]
    assert len(kept) == 6 and f"origins     its blocks are blocks {kept} of the original model" in printed


def test_a_dydit_model_without_token_routers_routes_and_keeps_both_steps(tiny_folder, tmp_path, capsys):
    from leandit.compress.dynamic import DynamicModel

    dydit = tmp_path / "dydit"
    assert main(["dynamic", str(tiny_folder), "--target", "0.9", "--no-tokens", "--steps", "2", "--out", str(dydit),
                 "--target-warmup", "0", *RUN]) == 0
    out = tmp_path / "routed"
    assert main(route(dydit / "model", out, "--regions", "2", steps=2)) == 0
    model = leandit.load_model(out / "model")
    assert isinstance(model, RoutedModel) and isinstance(model.inner, DynamicModel) and not model.inner.settings.tokens
    assert model.schedule.shape == (2, 2)
    assert [r["method"] for r in model.compression] == ["dydit", "diffcr"]
    capsys.readouterr()
    assert main(["info", str(out / "model")]) == 0
    printed = capsys.readouterr().out
    assert "compression 1. dydit: target 0.9" in printed and "compression 2. diffcr: 50% fewer block tokens" in printed
    assert "routing     DiffCR token routing" in printed


def test_route_fine_tunes_a_diffusers_dit_folder(tmp_path, capsys):
    from diffusers_models import tiny_diffusers_dit

    folder = leandit.save_model(tiny_diffusers_dit(depth=2), tmp_path / "dit")
    assert main(route(folder, tmp_path / "run", "--scale", "update", "--budget", "macs", "--batch-size", "8", steps=2)) == 0
    model = leandit.load_model(tmp_path / "run" / "model")
    assert isinstance(model, RoutedModel) and type(model.inner).__name__ == "DiTTransformer2DModel"
    assert model.settings.scale == "update" and model.schedule.shape == (2, 4)
    assert model.compression[-1]["training"]["budget"] == "macs"
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["budget_loss"] == pytest.approx((m["macs_ratio"] - 0.5) ** 2, rel=1e-4) for m in metrics)
    # The backbone's files stay diffusers' own: stock loading reads the trained (not EMA) weights.
    from diffusers import DiTTransformer2DModel

    stock = DiTTransformer2DModel.from_pretrained(str(tmp_path / "run" / "model"))
    raw = leandit.load_model(tmp_path / "run" / "model", weights="model").inner.state_dict()
    assert stock.state_dict().keys() == raw.keys()
    assert all(torch.equal(v, raw[k]) for k, v in stock.state_dict().items())
    assert any(not torch.equal(v, model.inner.state_dict()[k]) for k, v in raw.items())  # EMA differs: it trained
    capsys.readouterr()
    assert main(["info", str(tmp_path / "run" / "model")]) == 0
    assert "routing     DiffCR token routing" in capsys.readouterr().out


def test_a_routed_pixart_trains_on_captions_through_the_loop_and_saves(tmp_path):
    """PixArt: RouteJob on captioned digits (text embeddings and masks, label dropout to the
    empty prompt) through the training loop; the folder gives the frozen schedule back."""
    from diffusers_models import CaptionedDigits, tiny_pixart

    from leandit.backbones import backbone
    from leandit.commands.common import data_conditioning
    from leandit.compress.recovery import RecoverySettings
    from leandit.compress.routing.job import RouteJob, RoutingTraining
    from leandit.train import LoopConfig, Trainer

    model = RoutedModel(tiny_pixart(depth=2, num_attention_heads=2, attention_head_dim=8), RoutingSettings(regions=2))
    data = CaptionedDigits()
    job = RouteJob(model, RoutingTraining(target=0.5, router_lr=0.1), RecoverySettings.from_mix("plain"),
                   conditioning=data_conditioning(model, data))
    routers = [b.router.weight.detach().clone() for b in model.routed_blocks]
    config = LoopConfig(steps=3, global_batch_size=4, ema_decay=None, log_every=1, precision="fp32", checkpoint_every=3)
    result = Trainer(config, tmp_path / "run", device="cpu", progress=False).fit(job, data)
    assert result.steps == 3 and result.skipped_steps == 0
    assert (model.ratios < 1).all()  # the budget moved every ratio
    assert all(not torch.equal(a, b.router.weight) for a, b in zip(routers, model.routed_blocks))
    folder = leandit.save_model(model, tmp_path / "m")
    loaded = leandit.load_model(folder)
    assert isinstance(loaded, RoutedModel) and type(loaded.inner).__name__ == "PixArtTransformer2DModel"
    assert torch.equal(loaded.schedule, model.hard_schedule())
    x, cond = torch.stack([data[i][0] for i in range(2)]), {k: torch.stack([data[i][1][k] for i in range(2)]) for k in ("text", "text_mask")}
    t = torch.tensor([100, 100])
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(backbone(loaded).predict(x, t, cond), backbone(model).predict(x, t, cond), rtol=1e-5, atol=1e-5)


# -- refused inputs: one line, exit 2, no --out folder --------------------------------------

@pytest.mark.parametrize("target", ["0", "1", "1.5", "nan"])
def test_a_target_outside_zero_to_one_is_refused_before_any_work(tmp_path, capsys, target):
    err = error_of(route("digits-teacher", tmp_path / "out", target=target), capsys)
    assert "(0, 1)" in err and "--target" in err
    assert not (tmp_path / "out").exists()


def test_an_unknown_scale_is_refused(tmp_path, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(route("digits-teacher", tmp_path / "out", "--scale", "attention"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--scale" in err and "invalid choice: 'attention'" in err
    assert not (tmp_path / "out").exists()


def test_a_target_beyond_what_the_model_can_reach_is_refused(tiny_folder, tmp_path, capsys):
    err = error_of(route(tiny_folder, tmp_path / "out", "--budget", "macs", target="0.95"), capsys)
    assert "removes more than this model can" in err and "MACs" in err
    assert not (tmp_path / "out").exists()


def test_skipped_kv_on_a_diffusers_model_is_refused(tmp_path, capsys):
    from diffusers_models import tiny_diffusers_dit

    folder = leandit.save_model(tiny_diffusers_dit(depth=2), tmp_path / "dit")
    err = error_of(route(folder, tmp_path / "out", "--skipped-kv"), capsys)
    assert "leandit DiT/SiT blocks only" in err
    assert not (tmp_path / "out").exists()


def test_a_dydit_model_with_token_routers_is_refused(tmp_path, capsys):
    from leandit.compress.dynamic import DynamicModel

    folder = leandit.save_model(DynamicModel(randomize_(tiny_model(hidden_size=32, num_heads=4, depth=2), std=0.2)),
                                tmp_path / "dydit")
    err = error_of(route(folder, tmp_path / "out"), capsys)
    assert "already routes tokens" in err and "--no-tokens" in err
    assert not (tmp_path / "out").exists()


def test_a_damaged_router_file_is_refused_in_one_line(tiny_folder, tmp_path, capsys):
    from safetensors.torch import save_file

    routed = RoutedModel(leandit.load_model(tiny_folder), RoutingSettings(regions=1))
    folder = leandit.save_model(routed, tmp_path / "routed")
    routers = folder / "wrapper-0-diffcr.safetensors"
    good = load_file(str(routers))
    save_file({**good, "blocks.0.router.weight": torch.full_like(good["blocks.0.router.weight"], float("nan"))}, str(routers))
    err = error_of(["info", str(folder)], capsys)
    assert "NaN" in err
    err = error_of(["sample", str(folder), "--num-samples", "2", "--out", str(tmp_path / "samples"), "--device", "cpu"], capsys)
    assert "NaN" in err and not (tmp_path / "samples").exists()
    save_file({**good, "blocks.0.router.weight": torch.zeros(1, 33)}, str(routers))
    err = error_of(route(folder, tmp_path / "out"), capsys)
    assert "mis-shaped" in err and not (tmp_path / "out").exists()
