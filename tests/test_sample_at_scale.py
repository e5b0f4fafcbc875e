"""`leandit sample` at scale: parts split across ranks without duplicates or gaps, resume,
settings checks, and the streamed ADM .npz (two processes against one: test_ddp.py)."""

from __future__ import annotations

import numpy as np
import pytest

import leandit
from leandit.cli import main
from leandit.evaluate.feature_nets import read_images
from leandit.evaluate.sample_run import PartPlan
from conftest import randomize_, tiny_model

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


def test_the_images_never_sit_in_memory_at_once(tmp_path):
    """`leandit sample` holds one part at a time: rendering, writing the parts and streaming
    them into samples.npz. Traced by tracemalloc (numpy reports its buffers to it)."""
    import tracemalloc

    folder = tmp_path / "rgb"
    leandit.save_model(randomize_(tiny_model(depth=1, input_size=16, in_channels=3), std=0.1), folder)
    n = 6000
    args = ["sample", str(folder), "--num-samples", str(n), "--part-size", "100", "--steps", "1", "--sampler", "ddim",
            "--batch-size", "100", "--device", "cpu", "--quiet", "--out", str(tmp_path / "s")]
    tracemalloc.start()
    try:
        assert main(args) == 0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    images = read_images(tmp_path / "s" / "samples.npz")
    assert images.shape == (n, 16, 16, 3)
    assert peak < images.nbytes, f"peak {peak / 2**20:.1f} MiB for {images.nbytes / 2**20:.1f} MiB of images"
