"""`leandit sample` at scale: parts split across ranks without duplicates or gaps, resume,
settings checks, and the streamed ADM .npz."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import leandit
from leandit.cli import main
from leandit.evaluate.feature_nets import read_images
from leandit.evaluate.sample_run import PartPlan
from leandit.evaluate.sampling import generate, make_labels, to_uint8_images
from conftest import ROOT, randomize_, tiny_model
from test_ddp import torchrun

SAMPLE = ["--num-samples", "10", "--part-size", "3", "--sampler", "ddim", "--steps", "4", "--batch-size", "2", "--labels", "random",
          "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sampling") / "model"
    leandit.save_model(randomize_(tiny_model(depth=2), std=0.1), folder)
    return folder


def test_parts_cover_every_image_once_for_any_number_of_ranks():
    plan = PartPlan(10, 3)
    assert plan.num_parts == 4 and list(plan.indices(3)) == [9]
    for world in (1, 2, 3, 5):
        covered = [i for r in range(world) for p in plan.parts_of(r, world) for i in plan.indices(p)]
        assert sorted(covered) == list(range(10))
    with pytest.raises(ValueError, match="at least 1"):
        PartPlan(0, 3)


def test_two_processes_write_the_same_file_as_one_and_as_direct_generation(model_dir, tmp_path):
    torchrun(1, "-m", "leandit.cli", "sample", str(model_dir), *SAMPLE, "--out", str(tmp_path / "one"), cwd=ROOT)
    torchrun(2, "-m", "leandit.cli", "sample", str(model_dir), *SAMPLE, "--out", str(tmp_path / "two"), cwd=ROOT)
    one, two = np.load(tmp_path / "one" / "samples.npz"), np.load(tmp_path / "two" / "samples.npz")
    assert one["arr_0"].shape == (10, 8, 8, 1) and one["arr_0"].dtype == np.uint8
    assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["arr_1"], two["arr_1"])
    model = leandit.load_model(model_dir)
    labels = make_labels(10, 10, "random", 0)
    torch.set_num_threads(1)
    direct = to_uint8_images(generate(model, labels, sampler="ddim", steps=4, seed=0, batch_size=10, progress=False), "pixel")
    assert np.array_equal(one["arr_0"], direct) and np.array_equal(one["arr_1"], labels.numpy())
    assert (tmp_path / "one" / "grid.png").exists()


def test_an_interrupted_run_remakes_only_the_missing_part(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["sample", str(model_dir), *SAMPLE, "--out", str(out)]) == 0
    before = read_images(out / "samples.npz")
    parts = sorted((out / "parts").glob("part-*.npz"))
    assert [p.name for p in parts] == ["part-0000000-0000003.npz", "part-0000003-0000006.npz", "part-0000006-0000009.npz",
                                      "part-0000009-0000010.npz"]
    stamps = {p.name: p.stat().st_mtime_ns for p in parts}
    parts[1].unlink()
    parts[2].write_bytes(b"truncated")  # an incomplete file is made again too
    (out / "samples.npz").unlink()
    capsys.readouterr()
    assert main(["sample", str(model_dir), *SAMPLE, "--out", str(out)]) == 0
    assert "2 made by this process" in capsys.readouterr().err
    after = {p.name: p.stat().st_mtime_ns for p in sorted((out / "parts").glob("part-*.npz"))}
    assert after[parts[0].name] == stamps[parts[0].name] and after[parts[3].name] == stamps[parts[3].name]
    assert np.array_equal(read_images(out / "samples.npz"), before)
    assert main(["sample", str(model_dir), *SAMPLE, "--seed", "1", "--out", str(out)]) == 2
    assert "other settings (--seed was 0, now 1)" in capsys.readouterr().err
