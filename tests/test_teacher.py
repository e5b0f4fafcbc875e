"""The embedded digits teacher: a real pretrained model that a fresh clone can compress."""

from __future__ import annotations

from leandit.assets import digits_teacher_path
from leandit.data.digits import to_digits_range
from leandit.evaluate.digits import class_agreement
from leandit.evaluate.sampling import generate, make_labels
from leandit.models import load_model
from leandit.models.flops import count_parameters


def test_teacher_is_deep_enough_to_prune_in_half_and_small_enough_to_ship():
    folder = digits_teacher_path()
    model = load_model(folder)
    c = model.config
    assert c.depth >= 12 and c.depth % 2 == 0
    assert (c.in_channels, c.input_size, c.num_classes, c.space) == (1, 8, 10, "pixel")
    assert c.has_null_class and c.learn_sigma
    assert (folder / "model.safetensors").stat().st_size <= 25 * 2**20
    assert count_parameters(model) > 500_000


def test_teacher_samples_are_digits_of_the_asked_class():
    """200 class-conditional samples (the full check uses 1000: benchmarks/digits_teacher.md)."""
    model = load_model(digits_teacher_path())
    labels = make_labels(200, 10)
    x = generate(model, labels, sampler="ddim", steps=50, seed=123, batch_size=200, progress=False)
    assert class_agreement(to_digits_range(x), labels.numpy()) >= 0.9
