"""The digits feature network and the digits metrics through `leandit eval`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from leandit.cli import main
from leandit.evaluate.digits_features import ASSET, accuracy, digits_as_uint8, load_digits_features, split


def test_the_shipped_network_has_the_held_out_accuracy_its_readme_states():
    net = load_digits_features()
    _, test_x, _, test_y = split(0)
    measured = accuracy(net, test_x, test_y)
    stated = json.loads((ASSET / "info.json").read_text())["held_out_accuracy"]
    assert measured == pytest.approx(stated, abs=1e-9) and measured >= 0.975
    assert "98.0 %" in (ASSET / "README.md").read_text()


def test_digits_metrics_rank_real_digits_above_noise_and_shifted_digits(tmp_path, capsys):
    images, labels = digits_as_uint8()
    rng = np.random.default_rng(0)
    pick = rng.permutation(len(images))[:500]
    real = tmp_path / "real.npz"
    np.savez(real, arr_0=images[pick], arr_1=labels[pick])
    noise = tmp_path / "noise.npz"
    np.savez(noise, arr_0=rng.integers(0, 256, (500, 8, 8, 1), dtype=np.uint8), arr_1=labels[pick])
    results = {}
    for name, path in (("real", real), ("noise", noise)):
        assert main(["eval", str(path), "--ref", "digits", "--quiet"]) == 0
        results[name] = json.loads(capsys.readouterr().out)
    assert results["real"]["feature_network"] == "digits-cnn-v1" and "fid" not in results["real"]
    assert results["real"]["digits_fid"] < 0.05 * results["noise"]["digits_fid"]
    assert results["real"]["digits_precision"] > 0.9 > results["noise"]["digits_precision"]
    assert results["real"]["digits_inception_score"] > 5 > results["noise"]["digits_inception_score"]
