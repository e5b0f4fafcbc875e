"""The inpainting variant: a zero-initialised patch embedding of [known * (1 - mask), mask] on a
DiT. At init it is the base model bit for bit; it trains, saves and loads; its context follows
guidance's doubled batch; routing-style wrappers can swap its backbone's blocks; `leandit train
--inpaint` trains and resumes exactly; `leandit sample --inpaint` keeps the known pixels; every
bad input is a one-line error that writes nothing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import leandit
from conftest import randomize_, tiny_model
from leandit.backbones import backbone
from leandit.cli import main
from leandit.models.blocks import block_list, running_blocks
from leandit.models.guidance import classifier_free_guidance
from leandit.models.inpaint import MASK_KINDS, InpaintModel, inpaint_layer, parse_masks
from test_new_user import error_of

RUN = ["--batch-size", "8", "--device", "cpu", "--precision", "fp32", "--log-every", "1", "--quiet", "--lr", "1e-3"]


def inputs(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, 11, (n,), generator=g)  # 10 = the null class
    known = torch.randn(n, 1, 8, 8, generator=g)
    mask = (torch.rand(n, 1, 8, 8, generator=g) > 0.5).float()
    return x, t, y, known, mask


def trained(model: InpaintModel, seed: int = 1) -> InpaintModel:
    """The new embedding moved off zero, as training moves it."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.known_embedder.weight.copy_(torch.randn(model.known_embedder.weight.shape, generator=gen) * 0.3)
        model.known_embedder.bias.copy_(torch.randn(model.known_embedder.bias.shape, generator=gen) * 0.3)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny base model folder and a tiny inpainting model folder (embedding moved off zero)."""
    root = tmp_path_factory.mktemp("inpaint")
    base = leandit.save_model(randomize_(tiny_model(), std=0.15), root / "base")
    inpaint = leandit.save_model(trained(InpaintModel(leandit.load_model(base))), root / "inpaint")
    return base, inpaint


# -- the model ------------------------------------------------------------------------------

def test_at_init_it_is_the_base_model_exactly_whatever_the_known_image_and_mask():
    base = randomize_(tiny_model(), std=0.15)
    model = InpaintModel(randomize_(tiny_model(), std=0.15))
    x, t, y, known, mask = inputs()
    expected = base(x, t, y)
    assert torch.equal(model(x, t, y), expected)
    assert torch.equal(model(x, t, y, known=known, mask=mask), expected)
    with model.inpainting(known * 100, torch.ones_like(mask)):
        assert torch.equal(model(x, t, y), expected)


def test_the_new_weights_get_gradient_and_then_the_known_image_matters():
    model = InpaintModel(randomize_(tiny_model(), std=0.15))
    x, t, y, known, mask = inputs()
    model(x, t, y, known=known, mask=mask).square().mean().backward()
    grad = model.known_embedder.weight.grad
    assert grad is not None and grad.abs().sum() > 0 and model.known_embedder.bias.grad.abs().sum() > 0
    trained(model)
    with torch.no_grad():
        a = model(x, t, y, known=known, mask=mask)
        b = model(x, t, y, known=known + 1, mask=mask)
        c = model(x, t, y, known=known, mask=1 - mask)
    assert not torch.equal(a, b) and not torch.equal(a, c)
    # Known pixels enter as known * (1 - mask): changing an unknown pixel's value changes nothing.
    with torch.no_grad():
        assert torch.equal(a, model(x, t, y, known=known + 5 * mask, mask=mask))


def test_save_and_load_round_trip_the_new_weights_and_the_mask_convention(folders):
    _, folder = folders
    meta = json.loads((folder / "config.json").read_text())
    assert [w["type"] for w in meta["wrappers"]] == ["inpaint"]
    assert "mask 1 = unknown" in meta["wrappers"][0]["table"]["mask_convention"]
    assert set(load_file(str(folder / "wrapper-0-inpaint.safetensors"))) == {"known_embedder.weight", "known_embedder.bias"}
    assert not any(k.startswith("known_embedder") for k in load_file(str(folder / "model.safetensors")))
    model = leandit.load_model(folder)
    again = leandit.load_model(leandit.save_model(model, folder.parent / "again"))
    assert isinstance(again, InpaintModel) and inpaint_layer(again) is again
    x, t, y, known, mask = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, y, known=known, mask=mask), again(x, t, y, known=known, mask=mask))
    assert model.known_embedder.weight.abs().sum() > 0


def test_the_context_follows_guidances_doubled_batch():
    model = trained(InpaintModel(randomize_(tiny_model(), std=0.15)))
    x, t, y, known, mask = inputs()
    null = torch.full_like(y, 10)
    with torch.no_grad():
        with model.inpainting(known, mask):
            guided = classifier_free_guidance(backbone(model).predict, x, t, y, scale=2.0, channels=1, null_class=10)
        cond = model(x, t, y, known=known, mask=mask)
        uncond = model(x, t, null, known=known, mask=mask)
    expected = torch.cat([uncond[:, :1] + 2.0 * (cond[:, :1] - uncond[:, :1]), cond[:, 1:]], dim=1)
    assert torch.allclose(guided, expected, atol=1e-6)
    with pytest.raises(ValueError, match="whole multiple"):
        model(x[:3], t[:3], y[:3], known=known[:2], mask=mask[:2])
    with pytest.raises(ValueError, match=r"mask must be \(N, 1, 8, 8\)"):
        model(x, t, y, known=known, mask=mask[:, :, :4])


def test_only_a_plain_leandit_dit_is_wrapped():
    from leandit.compress.dynamic import DynamicModel

    with pytest.raises(ValueError, match="plain leandit DiT/SiT.*not a Linear.*leandit convert"):
        InpaintModel(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="not a DynamicModel: make the inpainting model first"):
        InpaintModel(DynamicModel(tiny_model()))
    model = tiny_model()
    InpaintModel(model)
    with pytest.raises(ValueError, match="already inside an InpaintModel"):
        InpaintModel(model)


def test_its_blocks_are_the_backbones_and_a_wrapper_can_swap_them():
    """block_list of the wrapper is the backbone's list (no copy, no extra state), a list set
    on the wrapper runs in the backbone, and DyDiT wraps it and runs its own blocks."""
    from leandit.compress.dynamic import DynamicModel

    inner = randomize_(tiny_model(depth=3), std=0.15)
    model = trained(InpaintModel(inner))
    keys = set(model.state_dict())
    assert block_list(model) is inner.blocks
    assert keys == {f"inner.{k}" for k in inner.state_dict()} | {"known_embedder.weight", "known_embedder.bias"}
    x, t, y, known, mask = inputs()
    with torch.no_grad():
        full = model(x, t, y, known=known, mask=mask)
        with running_blocks(model, [0, 2]):
            assert len(inner.blocks) == 2
            shallow = model(x, t, y, known=known, mask=mask)
    assert len(inner.blocks) == 3 and set(model.state_dict()) == keys and not torch.equal(full, shallow)
    dynamic = DynamicModel(model).eval()
    with torch.no_grad(), model.inpainting(known, mask):
        assert torch.allclose(dynamic(x, t, y), full, atol=1e-6)  # routers start fully open
        for block in dynamic.dynamic_blocks:
            block.width_routers.heads.bias.fill_(-20.0)  # every optional head off
        assert not torch.allclose(dynamic(x, t, y), full, atol=1e-3)
    assert inpaint_layer(dynamic) is model and backbone(dynamic).model is inner


# -- masks ------------------------------------------------------------------------------------

def test_mask_kinds_are_the_named_regions():
    u = torch.rand(6, 5, generator=torch.Generator().manual_seed(0))
    left = parse_masks("left", 8).draw(u)
    assert left.shape == (6, 1, 8, 8) and (left[:, :, :, :4] == 1).all() and (left[:, :, :, 4:] == 0).all()
    assert (parse_masks("bottom", 8).draw(u)[:, :, 4:] == 1).all() and parse_masks("top", 8).draw(u)[:, :, 4:].sum() == 0
    assert parse_masks("center", 8).draw(u)[0, 0, 2:6, 2:6].all() and parse_masks("center", 8).draw(u).mean() == 0.25
    assert parse_masks("all", 8).draw(u).all()
    box = parse_masks("box:1,2,5,8", 8).draw(u)[0, 0]
    assert box[2:8, 1:5].all() and box.sum() == 24  # columns 1..4, rows 2..7
    random = parse_masks("random", 8).draw(torch.rand(200, 5, generator=torch.Generator().manual_seed(1)))
    sides = random.amax(dim=2).sum(-1).flatten()  # the box widths
    assert sides.min() >= 2 and sides.max() <= 6 and len(set(sides.tolist())) > 2
    mixed = parse_masks("mixed", 8)
    assert mixed.kinds == MASK_KINDS
    assert parse_masks("left,right", 8).kinds == ("left", "right")


def test_mask_files_of_the_image_size(tmp_path):
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[:, 6:] = 1
    np.save(tmp_path / "m.npy", mask)
    Image.fromarray(mask * 255).save(tmp_path / "m.png")
    for name in ("m.npy", "m.png"):
        drawn = parse_masks(str(tmp_path / name), 8).draw(torch.rand(3, 5))
        assert torch.equal(drawn[:, 0], torch.from_numpy(mask).float().expand(3, 8, 8))
    np.save(tmp_path / "small.npy", np.ones((4, 4)))
    with pytest.raises(ValueError, match="the mask is 4x4, but the model's images are 8x8"):
        parse_masks(str(tmp_path / "small.npy"), 8)
    with pytest.raises(ValueError, match=r"values must be in \[0, 1\]"):
        np.save(tmp_path / "big.npy", np.full((8, 8), 3.0))
        parse_masks(str(tmp_path / "big.npy"), 8)


@pytest.mark.parametrize("spec, message", [("diagonal", "unknown mask spec"), ("left,up", "unknown mask spec"),
                                           ("box:0,0,9,4", "0 <= x0 < x1 <= 8"), ("box:1,2", "box:x0,y0,x1,y1"),
                                           ("nowhere.png", "no such mask file")])
def test_bad_mask_specs_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_masks(spec, 8)


# -- leandit train --inpaint ----------------------------------------------------------------

def train(base, out, *extra: str, steps: int = 4, masks: str = "mixed") -> list[str]:
    return ["train", "--model", str(base), "--data", "digits", "--inpaint", masks, "--steps", str(steps), "--out", str(out),
            "--checkpoint-every", "2", *RUN, *extra]


FILES = ("model.safetensors", "ema.safetensors", "wrapper-0-inpaint.safetensors")


def test_train_inpaint_fine_tunes_and_resumes_exactly(folders, tmp_path, capsys):
    base, _ = folders
    assert main(train(base, tmp_path / "run")) == 0
    folder = tmp_path / "run" / "model"
    model = leandit.load_model(folder, weights="model")
    assert isinstance(model, InpaintModel) and model.trained_masks == "mixed"
    assert model.known_embedder.weight.abs().sum() > 0  # it trained from zero
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and all(0 < m["unknown"] <= 1 for m in metrics)
    stopped = tmp_path / "stopped"
    assert main(train(base, stopped, "--stop-after", "2")) == 0
    assert not (stopped / "model").exists()
    err = error_of(train(base, stopped, masks="left"), capsys)
    assert "cannot resume" in err and "--inpaint mixed (now left)" in err
    assert main(train(base, stopped)) == 0
    for name in FILES:
        a, b = load_file(str(folder / name)), load_file(str(stopped / "model" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # Fine-tuning it further needs --inpaint again.
    err = error_of(["train", "--model", str(folder), "--data", "digits", "--steps", "2", "--out", str(tmp_path / "more"), *RUN], capsys)
    assert "inpainting model: pass --inpaint" in err and not (tmp_path / "more").exists()
    capsys.readouterr()
    assert main(["info", str(folder)]) == 0
    assert "inpainting  an inpainting variant: 2 extra input channels" in capsys.readouterr().out


def test_train_refuses_a_bad_mask_spec_before_writing(folders, tmp_path, capsys):
    base, _ = folders
    np.save(tmp_path / "small.npy", np.ones((4, 4)))
    for spec, message in ((str(tmp_path / "small.npy"), "4x4"), ("sideways", "unknown mask spec")):
        err = error_of(train(base, tmp_path / "out", masks=spec), capsys)
        assert message in err and not (tmp_path / "out").exists()


# -- leandit sample --inpaint -----------------------------------------------------------------

def sample(model, out, *extra: str, masks: str | None = "right", images: str | None = "digits") -> list[str]:
    argv = ["sample", str(model), "--out", str(out), "--steps", "3", "--num-samples", "12", "--part-size", "5",
            "--batch-size", "4", "--device", "cpu", "--quiet", *extra]
    return argv + (["--inpaint", masks] if masks else []) + (["--images", images] if images else [])


def test_sample_inpaint_keeps_the_known_pixels_and_writes_npz_masks_and_grid(folders, tmp_path):
    from leandit.evaluate.digits_features import split
    from leandit.evaluate.inpainting import complete, masks_for, to_model_space
    from leandit.evaluate.sampling import to_uint8_images

    _, model = folders
    out = tmp_path / "samples"
    assert main(sample(model, out, "--cfg-scale", "1.5", masks="random")) == 0
    images = np.load(out / "samples.npz")
    masks = np.load(out / "masks.npz")["arr_0"]
    _, held_out, _, labels = split(0)
    assert images["arr_0"].shape == (12, 8, 8, 1) and np.array_equal(images["arr_1"], labels[:12])
    assert masks.shape == (12, 8, 8) and 0 < masks.mean() < 1
    known = masks[..., None] == 0
    assert np.array_equal(images["arr_0"][known], held_out[:12][known])  # every known pixel exactly
    assert not np.array_equal(images["arr_0"], held_out[:12])
    assert Image.open(out / "grid.png").size[1] > 3 * 64  # masked input, completion, original rows
    # The parts are what `complete` makes in one go (noise and masks seeded by image).
    direct = complete(leandit.load_model(model), to_model_space(held_out[:12]), masks_for(parse_masks("random", 8), range(12), 0),
                      torch.from_numpy(labels[:12]), steps=3, cfg_scale=1.5, batch_size=12)
    assert np.array_equal(to_uint8_images(direct, "pixel"), images["arr_0"])
    # A rerun with other masks into the same folder is refused, naming the option.
    with pytest.raises(ValueError, match="--inpaint was 'random', now 'left'"):
        from leandit.cli import build_parser

        args = build_parser(["sample"]).parse_args(sample(model, out, "--cfg-scale", "1.5", masks="left"))
        args.run(args)


def test_sample_refuses_every_bad_inpainting_input_in_one_line(folders, tmp_path, capsys):
    base, model = folders
    out = tmp_path / "out"
    np.save(tmp_path / "small.npy", np.ones((4, 4)))
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, arr_0=np.zeros((3, 16, 16, 1), np.uint8), arr_1=np.zeros(3, np.int64))
    cases = [
        (sample(model, out, masks=str(tmp_path / "small.npy")), "the mask is 4x4, but the model's images are 8x8"),
        (sample(model, out, masks="zigzag"), "unknown mask spec"),
        (sample(base, out), "not an inpainting model"),
        (sample(model, out, masks=None, images=None), "this is an inpainting model: pass --inpaint"),
        (sample(model, out, images=None), "needs both --inpaint MASKS and --images"),
        (sample(model, out, images=str(tmp_path / "missing.npz")), "no such file"),
        (sample(model, out, images=str(wrong)), "images are 16x16x1 (H x W x C), but the model takes 8x8x1"),
        (sample(model, out, "--labels", "random"), "--labels does not apply with --inpaint"),
        (sample(model, out, "--num-samples", "500"), "holds 450 images"),
    ]
    for argv, message in cases:
        err = error_of(argv, capsys)
        assert message in err, (argv, err)
        assert not out.exists(), argv


def test_a_routed_inpainting_model_routes_its_backbones_blocks_and_round_trips(tmp_path):
    """DiffCR's RoutedModel wraps an InpaintModel: at ratio 1 it is the inpainting model, a
    schedule of fewer tokens changes what runs, and the folder keeps both wrappers."""
    from leandit.compress.routing import RoutedModel
    from leandit.evaluate.inpainting import complete

    model = trained(InpaintModel(randomize_(tiny_model(), std=0.15)))
    routed = RoutedModel(model).eval()
    x, t, y, known, mask = inputs()
    with torch.no_grad():
        full = model(x, t, y, known=known, mask=mask)
        with model.inpainting(known, mask):
            assert torch.allclose(routed(x, t, y), full, atol=1e-6)
            routed.set_schedule(torch.ones(routed.depth, routed.settings.regions, dtype=torch.long))  # one token per block
            fewer = routed(x, t, y)
    assert not torch.allclose(fewer, full, atol=1e-3)
    folder = leandit.save_model(routed, tmp_path / "routed")
    assert [w["type"] for w in json.loads((folder / "config.json").read_text())["wrappers"]] == ["inpaint", "diffcr"]
    again = leandit.load_model(folder)
    assert inpaint_layer(again) is not None and backbone(again).model is inpaint_layer(again).inner
    with torch.no_grad(), inpaint_layer(again).inpainting(known, mask):
        assert torch.equal(again(x, t, y), fewer)
    out = complete(again, known, mask, y.clamp(max=9), steps=2)
    assert torch.equal(out[mask.expand_as(out) == 0], known[mask.expand_as(known) == 0])


def test_routing_an_inpainting_model_fine_tunes_it_on_inpainting_masks():
    """`leandit route` of an inpainting model draws masks per step (the known image reaches the
    model: its new embedding gets gradient), and refuses a teacher, which would not see them."""
    from leandit.compress.recovery import RecoverySettings
    from leandit.compress.routing import RoutedModel
    from leandit.compress.routing.job import RouteJob, RoutingTraining
    from leandit.diffusion import StepRandom

    model = InpaintModel(randomize_(tiny_model(depth=2), std=0.15))  # adaLN-zero init would hide every input
    routed = RoutedModel(model)
    training = RoutingTraining(target=0.5)
    masks = parse_masks("left", backbone(model).spec.input_size)
    job = RouteJob(routed, training, RecoverySettings.from_mix("plain"), masks=masks)
    x0 = torch.randn(4, *backbone(model).spec.input_shape)
    batch = (x0, torch.arange(4) % 10)
    routed.train()
    seen = []
    handle = model.register_forward_pre_hook(lambda m, args: seen.append(m._context) and None)
    loss, _ = job.compute_loss(routed, batch, StepRandom(0, 0, 4, 0, 1, "cpu"))
    handle.remove()
    loss.backward()
    # Every forward of the step saw the batch's images as known, with the left half unknown.
    left = torch.zeros(1, 1, 8, 8)
    left[..., :4] = 1
    assert seen and all(c is not None and torch.equal(c[0], x0) and torch.equal(c[1], left.expand(4, -1, -1, -1)) for c in seen)
    assert model.known_embedder.weight.grad is not None and model.known_embedder.weight.grad.abs().sum() > 0
    assert job.state_dict()["inpainting"] == {"masks": "left"}
    with pytest.raises(ValueError, match="own loss"):
        RouteJob(routed, training, RecoverySettings.from_mix("kd"), teacher=tiny_model(depth=2), masks=masks)
    with pytest.raises(ValueError, match="not an inpainting variant"):
        RouteJob(RoutedModel(tiny_model(depth=2)), training, RecoverySettings.from_mix("plain"), masks=masks)
