"""`leandit analyze ratios` on a routed digits teacher: the table is the model's schedule (one
row per block), the token maps count the blocks whose `kept` holds each token, and a model
that does not route tokens is refused before anything is written."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

import leandit
from leandit.cli import main
from leandit.compress.routing import RoutedModel, RoutingSettings
from leandit.evaluate.ratios import kept_counts, ratio_profile, token_maps
from test_new_user import error_of  # the one-line error of a refused command


@pytest.fixture(scope="module")
def routed_folder(tmp_path_factory):
    """The digits teacher routed with varied ratios per block and region, frozen and saved."""
    model = RoutedModel(leandit.load_model("digits-teacher"), RoutingSettings(regions=4, bins=10))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.ratios.copy_(0.1 + 0.9 * torch.rand(model.ratios.shape, generator=gen))
    model.freeze()
    folder = tmp_path_factory.mktemp("routed") / "model"
    leandit.save_model(model, folder)
    return folder


def test_the_table_and_plots_are_the_models_schedule(routed_folder, tmp_path, capsys):
    out = tmp_path / "ratios"
    capsys.readouterr()
    argv = ["analyze", "ratios", str(routed_folder), "--out", str(out), "--samples", "2", "--sampling-steps", "8"]
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 + 12 + 1 and printed[1].split()[0] == "0"  # a header, one line per block, the MACs
    model = leandit.load_model(routed_folder)
    table = model.ratio_table()
    with open(out / "ratios.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["block", *[f"ratio_region{g}" for g in range(4)], *[f"k_region{g}" for g in range(4)]]
    assert len(rows) == 1 + 12  # one row per block
    assert [[int(v) for v in row[5:]] for row in rows[1:]] == table["schedule"]
    assert np.allclose([[float(v) for v in row[1:5]] for row in rows[1:]], table["ratios"], atol=1e-4)
    assert len({tuple(row[5:]) for row in rows[1:]}) > 1  # the schedule differs between blocks
    summary = json.loads((out / "summary.json").read_text())
    assert summary["macs_ratio_per_region"] == pytest.approx(table["macs_ratio_per_region"])
    assert summary["token_maps"]["steps"] == 8 and len(summary["token_maps"]["shown_timesteps"]) == 4
    assert (out / "ratios.png").stat().st_size > 5000 and (out / "token_maps.png").stat().st_size > 5000


def test_the_token_maps_count_the_blocks_that_kept_each_token(routed_folder):
    model = leandit.load_model(routed_folder)
    profile = ratio_profile(model)
    maps = token_maps(model, samples=3, steps=6)
    assert maps.counts.shape == (6, 3, 16) and maps.grid == (4, 4) and maps.images.shape == (3, 8, 8, 1)
    # Each step's count of a token: the blocks whose recorded indices hold it; so every image's
    # counts sum to the scheduled capacities of its region.
    regions = [int(t * 4 // 1000) for t in maps.timesteps]
    for step, g in enumerate(regions):
        assert (maps.counts[step].sum(axis=1) == profile.schedule[:, g].sum()).all()
    # Against `.kept` directly, on one forward of a batch whose images fall in different regions.
    x = torch.randn(4, 1, 8, 8)
    t = torch.tensor([10, 300, 600, 990])
    y = torch.tensor([0, 1, 2, 3])
    with model.recording(), torch.no_grad():
        model(x, t, y)
        counts = kept_counts(model, 4)
        expected = np.zeros((4, 16), dtype=np.int64)
        for block in model.routed_blocks:
            # One entry per capacity the block ran (regions sharing a k share it): each image once.
            assert sorted(i for images, _ in block.kept for i in images.tolist()) == [0, 1, 2, 3]
            for images, index in block.kept:
                for row, tokens in zip(images.tolist(), index.tolist()):
                    expected[row, tokens] += 1
    assert (counts == expected).all()
    assert counts.sum(axis=1).tolist() == [int(profile.schedule[:, g].sum()) for g in range(4)]


def test_a_model_that_does_not_route_tokens_is_refused_before_any_output(tmp_path, capsys):
    err = error_of(["analyze", "ratios", "digits-teacher", "--out", str(tmp_path / "dense")], capsys)
    assert "does not route tokens" in err and "leandit route" in err and not (tmp_path / "dense").exists()
