"""MAR generation through leandit's sampling, bench and info: the unmasking and guidance
schedules against their closed forms, the head's DDPM against a computation by hand,
per-image noise (batch size, guidance), and `leandit sample` / `eval` / `bench` / `info` on
tiny MAR folders as a user runs them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import leandit
from leandit.cli import main
from leandit.diffusion import GaussianDiffusion, PerSampleNoise, mix_seed
from leandit.diffusion.masked import MaskedDiffusion, guidance_at, patchify, unknown_after_step
from leandit.evaluate.feature_nets import read_images
from leandit.evaluate.sampling import generate, to_uint8_images
from leandit.evaluate.speed import LoopProfile, generation_loop, measure_generation_speed
from leandit.models.blocks import keep_blocks
from leandit.models.flops import generation_schedule, mar_generation_macs
from leandit.models.mar import MAR
from leandit.models.mar_config import MARConfig
from conftest import randomize_, tiny_model

TINY = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, encoder_depth=2, encoder_heads=2,
            decoder_hidden_size=32, decoder_depth=2, decoder_heads=2, buffer_size=4, num_classes=10, head_depth=2,
            head_width=32, space="pixel", attn_dropout=0.0, proj_dropout=0.0)
# The tiny MAR as a named size on the command line (random weights).
TINY_SPEC = "MAR-B:" + ",".join(f"{k}={json.dumps(v)}" for k, v in TINY.items())


def tiny_mar(seed: int = 0, **overrides) -> MAR:
    """A randomised tiny MAR (a fresh one's head outputs zeros: its final layer starts at zero).
    Its untrained head does not predict the noise, so the predicted x0 at t = 999 is the
    noise / sqrt(alpha_bar) and images reach 1e5: compare them relative to their size."""
    return randomize_(MAR(MARConfig(**{**TINY, **overrides})), std=0.2, seed=seed).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny MAR folder and a depth-pruned copy (encoder block 0, decoder block 1)."""
    root = tmp_path_factory.mktemp("mar")
    model = tiny_mar()
    leandit.save_model(model, root / "full")
    leandit.save_model(keep_blocks(model, [0, 3]), root / "pruned", compression=[
        {"method": "manual", "kept_indices": [0, 3], "source_depth": 4,
         "kept_by_list": {"encoder_blocks": [0], "decoder_blocks": [1]}}])
    return root


def one_line_error(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    return err


# -- the schedules ------------------------------------------------------------------------------


def reference_schedule(seq_len: int, num_iter: int) -> list[tuple[int, int]]:
    """(unknown after the step as MAR's mask_len, tokens predicted) per step, from the closed
    form floor(L cos(pi/2 (s + 1) / S)) in float64 numpy, at least one token per step, all at
    the last."""
    unknown, out = seq_len, []
    for s in range(num_iter):
        planned = int(np.floor(seq_len * np.cos(np.pi / 2 * (s + 1) / num_iter)))
        after = max(1, min(unknown - 1, planned))
        left = 0 if s == num_iter - 1 else after
        out.append((after, unknown - left))
        unknown = left
    return out


def test_the_cosine_unmasking_schedule_of_256_tokens_in_64_steps():
    reference = reference_schedule(256, 64)
    unknown, afters = 256, []
    for s in range(64):
        afters.append(unknown_after_step(s, 64, 256, unknown))
        unknown = afters[-1]
    assert afters == [a for a, _ in reference]
    assert all(a > b for a, b in zip(afters, afters[1:]))  # strictly fewer unknown after every step
    predicted = [p for _, p in reference]
    assert sum(predicted) == 256 and min(predicted) >= 1
    # Near the start the cosine falls by less than a token per step: one token each until
    # 256 (1 - cos(pi (s + 1) / 128)) exceeds s + 1, i.e. 13 steps; then the last step
    # predicts the floor(256 cos(31 pi / 64)) = 6 tokens the cosine left.
    assert predicted[:13] == [1] * 13 and predicted[13] == 2
    assert afters[-2] == math.floor(256 * math.cos(math.pi / 2 * 63 / 64)) == 6 and predicted[-1] == 6
    schedule = generation_schedule(64, 256)
    assert [(s["after"], s["predicted"]) for s in schedule] == reference
    assert [s["known"] for s in schedule] == list(np.cumsum([0] + predicted[:-1]))


def test_the_linear_guidance_schedule():
    for after in (255, 128, 1):
        assert guidance_at(3.0, "linear", 256, after) == pytest.approx(1 + 2.0 * (256 - after) / 256, abs=1e-12)
        assert guidance_at(3.0, "constant", 256, after) == 3.0
    assert guidance_at(1.0, "linear", 256, 7) == 1.0
    with pytest.raises(ValueError, match="linear"):
        guidance_at(3.0, "cosine", 256, 7)


@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_each_iteration_guides_with_the_scale_of_its_schedule(monkeypatch, schedule):
    """The loop's guided epsilon is uncond + s (cond - uncond): a head whose conditional rows
    say 1 and unconditional rows 0 makes it s, read at every head step."""
    model = tiny_mar()
    c = model.config

    def head(x, t, z):  # the guided call: conditional rows first, then the unconditional ones
        out = torch.zeros(x.shape[0], 2 * c.token_dim, dtype=x.dtype)
        out[: x.shape[0] // 2, : c.token_dim] = 1.0
        return out

    model.head = head
    seen: list[float] = []
    original = GaussianDiffusion.sample

    def spy(self, model_fn, noise, **kwargs):
        def recorded(x, t):
            out = model_fn(x, t)
            seen.append(float(out[0, 0]))
            return out

        return original(self, recorded, noise, **kwargs)

    monkeypatch.setattr(GaussianDiffusion, "sample", spy)
    leandit.backbones.backbone(model).generate(torch.tensor([1, 2]), PerSampleNoise(0, [0, 1]), num_iter=6, cfg_scale=4.0,
                                                cfg_schedule=schedule, head_steps=2)
    per_step = seen[::2]
    assert seen[1::2] == per_step  # the same scale at both head steps of an iteration
    expected = [1 + 3.0 * (16 - after) / 16 if schedule == "linear" else 4.0 for after, _ in reference_schedule(16, 6)]
    assert per_step == pytest.approx(expected, abs=1e-6)


# -- the head's DDPM -----------------------------------------------------------------------------


def reference_head_means(model: MAR, z: torch.Tensor, x: torch.Tensor, steps: int) -> torch.Tensor:
    """The head's DDPM at temperature 0 by hand (float64): the cosine schedule of 1000 steps
    (ADM's alpha_bar, betas capped at 0.999), respaced to `steps` evenly spaced timesteps with
    both ends; x_{t-1} = the posterior mean given the predicted x0 at every step (x0 clamped to
    [-1, 1] for a pixel-space model, whose tokens are images)."""
    T = 1000
    alpha_bar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = np.array([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)])
    cumulative = np.cumprod(1 - betas)
    kept = [round(k * (T - 1) / (steps - 1)) for k in range(steps)]
    c = model.config.token_dim
    for k in reversed(range(steps)):
        ac = cumulative[kept[k]]
        ac_prev = cumulative[kept[k - 1]] if k > 0 else 1.0
        beta = 1 - ac / ac_prev
        eps = model.head(x, torch.full((x.shape[0],), kept[k]), z)[:, :c].double()
        x0 = x / math.sqrt(ac) - math.sqrt(1 / ac - 1) * eps
        if model.config.space == "pixel":
            x0 = x0.clamp(-1, 1)
        x = beta * math.sqrt(ac_prev) / (1 - ac) * x0 + (1 - ac_prev) * math.sqrt(1 - beta) / (1 - ac) * x
    return x


@pytest.mark.parametrize("space", ["pixel", "latent"])
def test_temperature_zero_is_the_head_posterior_mean_path(space):
    """One iteration (every token predicted from the all-unknown context): at temperature 0
    each token is the head's DDPM mean path from its start noise, the second draw of its
    image's stream (the first is the order); pixel-space heads clamp their x0."""
    model = tiny_mar(seed=1, space=space).double()
    c = model.config
    labels, indices, seed = torch.tensor([3, 7]), [5, 9], 11
    with torch.no_grad():
        out = leandit.backbones.backbone(model).generate(labels, PerSampleNoise(seed, indices), num_iter=1, temperature=0.0,
                                                         head_steps=10)
        for i, (label, index) in enumerate(zip(labels, indices)):
            g = torch.Generator().manual_seed(mix_seed(seed, index))
            order = torch.randn(c.num_tokens, generator=g).argsort()
            start = torch.randn(c.num_tokens, c.token_dim, generator=g).double()  # row j is token order[j]
            z = model.context(torch.zeros(1, c.num_tokens, c.token_dim, dtype=torch.float64),
                              torch.ones(1, c.num_tokens, dtype=torch.bool), label[None])[0, order]
            expected = torch.zeros(c.num_tokens, c.token_dim, dtype=torch.float64)
            expected[order] = reference_head_means(model, z, start, 10)
            got = patchify(out[i : i + 1].double(), c.patch_size)[0]
            # to float32 rounding (the schedule tables and the images are float32): 1e-7 of the size
            assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6 * expected.abs().max())
        noisy = leandit.backbones.backbone(model).generate(labels, PerSampleNoise(seed, indices), num_iter=1, head_steps=10)
    assert not torch.allclose(noisy, out, rtol=1e-3)  # temperature 1 adds the step noise


# -- per-image noise and guidance ------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_images_depend_on_their_seed_not_on_the_batch(cfg):
    # float64: batches of other sizes round differently in float32 (1e-7 of the images' size)
    model = tiny_mar().double()
    labels = torch.tensor([0, 1, 2, 3, 9])
    options = dict(steps=6, head_steps=8, cfg_scale=cfg, progress=False)
    a = generate(model, labels, seed=4, batch_size=5, **options)
    assert torch.equal(a, generate(model, labels, seed=4, batch_size=5, **options))  # deterministic
    scale = a.abs().max()
    b = generate(model, labels, seed=4, batch_size=2, **options)
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-7 * scale)
    tail = generate(model, labels[3:], seed=4, indices=range(3, 5), batch_size=1, **options)
    assert torch.allclose(a[3:], tail, rtol=1e-6, atol=1e-7 * scale)  # images 3, 4 of the larger run
    other = generate(model, labels, seed=5, batch_size=5, **options)
    assert (a - other).abs().max() > 0.1 * scale


def test_guidance_at_scale_one_is_no_guidance_and_the_guided_halves_line_up():
    model = tiny_mar()
    labels = torch.tensor([1, 4])
    plain = generate(model, labels, steps=5, head_steps=6, progress=False)
    assert torch.equal(plain, generate(model, labels, steps=5, head_steps=6, cfg_scale=1.0, cfg_schedule="constant",
                                       progress=False))
    # Guided images of the null class: both halves are the same, so any scale gives the
    # unguided images (the doubled batch, the rows each half predicts and the conditional
    # half's variance all line up).
    null = torch.full((2,), model.null_class)
    adapter = leandit.backbones.backbone(model)
    unguided = adapter.generate(null, PerSampleNoise(0, [0, 1]), num_iter=5, head_steps=6)
    for schedule in ("linear", "constant"):
        guided = adapter.generate(null, PerSampleNoise(0, [0, 1]), num_iter=5, head_steps=6, cfg_scale=3.0, cfg_schedule=schedule)
        assert torch.allclose(guided, unguided, rtol=1e-5, atol=1e-5 * unguided.abs().max())
    # ... while for class labels guidance changes the images (0.7 % of their size here,
    # against float32 rounding at 1e-6).
    guided = generate(model, labels, steps=5, head_steps=6, cfg_scale=3.0, progress=False)
    assert (guided - plain).abs().max() > 1e-3 * plain.abs().max()


def test_options_that_do_not_fit_are_refused():
    model = tiny_mar()
    labels = torch.tensor([1])
    for options, message in (({"steps": 17}, "1 to its 16 tokens"), ({"steps": 0}, "1 to its 16 tokens"),
                             ({"temperature": -1.0}, "--temperature"), ({"cfg_schedule": "cosine"}, "--cfg-schedule"),
                             ({"head_steps": 1001}, "--head-steps"), ({"sampler": "ddim"}, "does not fit a masked model"),
                             ({"guided_channels": 1, "cfg_scale": 2.0}, None), ({"eta": 0.5}, "--eta")):
        if message is None:  # all channels is what MAR guides: accepted
            generate(model, labels, steps=2, head_steps=2, progress=False, **options)
            continue
        with pytest.raises(ValueError, match=message):
            generate(model, labels, progress=False, **options)
    dit = tiny_model()
    with pytest.raises(ValueError, match="--temperature, --head-steps apply to MAR models only"):
        generate(dit, labels, steps=2, temperature=0.5, head_steps=3, progress=False)


# -- the MACs of the loop ----------------------------------------------------------------------------


def test_the_loop_macs_are_what_a_real_loop_runs():
    """`mar_generation_macs` counts pieces on meta tensors; torch's counter over a real loop
    (CPU) must agree in total, and without the blocks by the block part."""
    from torch.utils.flop_counter import FlopCounterMode

    from leandit.models.blocks import running_blocks
    from leandit.models.flops import _register_cpu_attention

    _register_cpu_attention()
    model = keep_blocks(tiny_mar(), [0, 1, 3])  # lists of different lengths: 2 + 1

    def real(cfg: float) -> int:
        with FlopCounterMode(display=False) as counter:
            generation_loop(model, 3, cfg, "cpu", num_iter=4, head_steps=2)()
        return counter.get_total_flops() // 2

    for cfg in (1.0, 2.0):
        counted = mar_generation_macs(model, 3, num_iter=4, head_steps=2, guided=cfg != 1.0)
        assert counted["total"] == real(cfg) and counted["blocks"] > 0 and counted["head"] > 0
        with running_blocks(model, []):
            assert real(cfg) == counted["head"] + counted["other"]
    one = mar_generation_macs(model, 1, num_iter=5, head_steps=4)
    assert mar_generation_macs(model, 2, num_iter=5, head_steps=4, guided=True)["total"] == 4 * one["total"]


# -- timing the loop's parts ----------------------------------------------------------------------


def test_the_loop_profile_times_every_call_and_the_parts_fit_the_total():
    import time

    model = tiny_mar()
    loop = generation_loop(model, 2, 3.0, "cpu", num_iter=6, head_steps=5)
    calls = {"context": 0, "head": 0}
    with torch.inference_mode(), LoopProfile(model, "cpu") as profile:
        timed = {"context": model.context, "head": model.head}  # the profile's timed wrappers

        def counting(name):
            def call(*args):
                calls[name] += 1
                return timed[name](*args)
            return call

        model.context, model.head = counting("context"), counting("head")
        started = time.perf_counter()
        loop()
        total = time.perf_counter() - started
        parts = profile.read()
    assert calls == {"context": 6, "head": 6 * 5}
    assert 0 < parts["blocks"] < parts["context"] and 0 < parts["head"]
    assert parts["context"] + parts["head"] < total
    assert "context" not in model.__dict__ and "head" not in model.__dict__  # the methods are back
    assert not model.encoder_blocks[0]._forward_pre_hooks and not model.decoder_blocks[-1]._forward_hooks
    # With run_steps only those steps run the network (the encoder's first block sees them).
    ran = []
    handle = model.encoder_blocks[0].register_forward_pre_hook(lambda m, a: ran.append(a[0].shape[1]))
    try:
        with torch.inference_mode(), LoopProfile(model, "cpu", run_steps={1, 4}, schedule=generation_schedule(6, 16)):
            loop()
    finally:
        handle.remove()
    known = [s["known"] for s in reference_schedule_known(16, 6)]
    assert ran == [4 + known[1], 4 + known[4]]  # buffer + known tokens of steps 1 and 4


def reference_schedule_known(seq_len: int, num_iter: int) -> list[dict[str, int]]:
    known, out = 0, []
    for _, predicted in reference_schedule(seq_len, num_iter):
        out.append({"known": known})
        known += predicted
    return out


def test_measurement_rows_add_up_and_relate_to_the_first_model():
    full, pruned = tiny_mar(), keep_blocks(tiny_mar(), [0, 2])
    rows = measure_generation_speed([("full", full), ("pruned", pruned)], 2, cfg_scale=2.0, num_iter=4, head_steps=3,
                                    warmup=0, rounds=3)
    for r in rows:
        assert r.blocks_s + r.head_s + r.rest_s == pytest.approx(r.seconds_per_image, rel=1e-9)
        assert r.blocks_s > 0 and r.head_s > 0 and r.rest_s > 0 and r.guided
        assert r.images_per_s == pytest.approx(1 / r.seconds_per_image)
    assert (rows[0].encoder_depth, rows[0].decoder_depth, rows[1].encoder_depth, rows[1].decoder_depth) == (2, 2, 1, 1)
    assert rows[0].speedup == 1.0 and rows[1].speedup == pytest.approx(rows[0].seconds_per_image / rows[1].seconds_per_image)
    assert rows[1].block_speedup == pytest.approx(rows[0].blocks_s / rows[1].blocks_s)
    assert rows[0].flops_per_image == 2 * mar_generation_macs(full, 2, num_iter=4, head_steps=3, guided=True)["total"] // 2
    strided = measure_generation_speed([("full", full)], 2, num_iter=4, head_steps=3, warmup=0, rounds=1, step_stride=2)[0]
    assert strided.step_stride == 2 and 0.8 < strided.macs_coverage < 1.2 and strided.rest_s > 0
    with pytest.raises(ValueError, match="must divide"):
        measure_generation_speed([("full", full)], 2, num_iter=5, step_stride=2)
    with pytest.raises(ValueError, match="not a MAR model"):
        measure_generation_speed([("dit", tiny_model())], 2)


# -- the commands ------------------------------------------------------------------------------------

SAMPLE = ["--num-samples", "5", "--part-size", "2", "--steps", "4", "--head-steps", "5", "--batch-size", "2", "--device", "cpu",
          "--quiet"]


def test_sample_writes_resumes_and_refuses_changed_settings(folders, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sample", str(folders / "full"), *SAMPLE, "--cfg-scale", "2", "--out", str(out)]) == 0
    with np.load(out / "samples.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (5, 8, 8, 1) and images.dtype == np.uint8 and labels.tolist() == [0, 1, 2, 3, 4]
    assert (out / "grid.png").exists()
    settings = json.loads((out / "sampling.json").read_text())
    assert {k: settings[k] for k in ("sampler", "steps", "cfg_scale", "temperature", "cfg_schedule", "head_steps")} == \
        {"sampler": "mar", "steps": 4, "cfg_scale": 2.0, "temperature": 1.0, "cfg_schedule": "linear", "head_steps": 5}
    # The same images as the library makes, whatever the batch size.
    x = generate(leandit.load_model(folders / "full"), torch.as_tensor(labels), steps=4, head_steps=5, cfg_scale=2.0,
                 batch_size=5, progress=False)
    assert np.array_equal(to_uint8_images(x, "pixel"), images)
    parts = sorted((out / "parts").glob("part-*.npz"))
    parts[1].unlink()
    (out / "samples.npz").unlink()
    capsys.readouterr()
    assert main(["sample", str(folders / "full"), *SAMPLE, "--cfg-scale", "2", "--cfg-schedule", "linear", "--out", str(out)]) == 0
    assert "1 made by this process" in capsys.readouterr().err  # the explicit default is the same setting
    assert np.array_equal(read_images(out / "samples.npz"), images)
    err = one_line_error(["sample", str(folders / "full"), *SAMPLE, "--cfg-scale", "2", "--temperature", "0.5", "--out", str(out)],
                         capsys)
    assert "other settings (--temperature was 1.0, now 0.5)" in err
    err = one_line_error(["sample", str(folders / "full"), *SAMPLE, "--cfg-scale", "2", "--cfg-schedule", "constant",
                          "--head-steps", "6", "--out", str(out)], capsys)
    assert "--cfg-schedule was 'linear', now 'constant'" in err and "--head-steps was 5, now 6" in err


def test_two_processes_make_the_images_of_one(folders, tmp_path):
    """torchrun splits the parts: rank r makes parts r, r + 2, ...; the images are one
    process's (each image's order and head noise come from its own seed)."""
    import subprocess
    import sys

    from conftest import ROOT

    one, two = tmp_path / "one", tmp_path / "two"
    argv = ["sample", str(folders / "full"), *SAMPLE, "--cfg-scale", "2"]
    assert main([*argv, "--out", str(one)]) == 0
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                           "leandit.cli", *argv, "--out", str(two)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert np.array_equal(read_images(two / "samples.npz"), read_images(one / "samples.npz"))
    assert json.loads((two / "sampling.json").read_text()) == json.loads((one / "sampling.json").read_text())


def test_sample_refuses_options_that_do_not_fit_before_writing(folders, tmp_path, capsys):
    out = tmp_path / "never"
    mar = ["sample", str(folders / "full"), "--out", str(out), "--device", "cpu", "--quiet"]
    assert "does not fit a masked model" in one_line_error([*mar, "--sampler", "ddim"], capsys)
    assert "1 to its 16 tokens" in one_line_error([*mar, "--steps", "17"], capsys)
    for bad in ("0", "1001", "ddim0", "fast", "10,x"):
        assert f"--head-steps must be a step count 1..1000, 'ddimN' or comma-separated counts per section, got '{bad}'" in \
            one_line_error([*mar, "--head-steps", bad], capsys)
    assert "--temperature must be 0" in one_line_error([*mar, "--temperature", "-0.1"], capsys)
    assert "--guided-channels does not apply to MAR" in one_line_error([*mar, "--guided-channels", "1"], capsys)
    assert "--eta applies to DDIM only" in one_line_error([*mar, "--eta", "0.3"], capsys)
    assert "--vae applies to latent-space models" in one_line_error([*mar, "--vae", str(tmp_path)], capsys)
    dit = tmp_path / "dit"
    leandit.save_model(tiny_model(), dit)
    err = one_line_error(["sample", str(dit), "--out", str(out), "--device", "cpu", "--temperature", "0.5"], capsys)
    assert "--temperature applies to MAR models only; this is a DiT (diffusion) model" in err
    assert "--cfg-schedule applies to MAR models only" in one_line_error(
        ["sample", str(dit), "--out", str(out), "--device", "cpu", "--cfg-schedule", "constant"], capsys)
    assert "sampler 'mar' does not fit a diffusion model" in one_line_error(
        ["sample", str(dit), "--out", str(out), "--device", "cpu", "--sampler", "mar"], capsys)
    with pytest.raises(SystemExit):
        main([*mar, "--cfg-schedule", "cosine"])  # argparse: not one of the choices
    capsys.readouterr()
    assert not out.exists()


def _vae(latent_channels: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=latent_channels, norm_num_groups=8, sample_size=8)
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(8)  # spread the random decoder's output over [-1, 1]
    return vae.eval()


def test_a_latent_mar_decodes_with_its_own_latent_scale_and_refuses_a_vae_of_other_channels(tmp_path, capsys):
    """MAR's KL-16 latents (16 channels) were multiplied by the config's latent_scale 0.2325
    (written out here: MAR's constant), not by the VAE config's 0.18215 default."""
    model = tiny_mar(input_size=4, patch_size=1, in_channels=16, space="latent")
    leandit.save_model(model, tmp_path / "model")
    for channels in (16, 4):
        _vae(channels).save_pretrained(tmp_path / f"vae{channels}")
    out = tmp_path / "s"
    argv = ["sample", str(tmp_path / "model"), "--num-samples", "2", "--steps", "3", "--head-steps", "4", "--device", "cpu",
            "--quiet", "--grid", "0"]
    err = one_line_error([*argv, "--vae", str(tmp_path / "vae4"), "--out", str(out)], capsys)
    assert "the VAE decodes 4-channel latents but" in err and "16-channel" in err
    assert not out.exists()
    assert main([*argv, "--vae", str(tmp_path / "vae16"), "--out", str(out)]) == 0
    latents = generate(model, torch.tensor([0, 1]), steps=3, head_steps=4, progress=False)
    vae = _vae(16)
    with torch.no_grad():
        by_hand = vae.decode(latents / 0.2325).sample
    expected = ((by_hand.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(read_images(out / "samples.npz"), expected)
    with pytest.raises(ValueError, match="the VAE decodes 4-channel latents"):
        to_uint8_images(latents, "latent", _vae(4))


def test_eval_gives_the_digits_metrics_of_mar_samples(folders, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sample", str(folders / "full"), *SAMPLE, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(out / "samples.npz"), "--ref", "digits", "--quiet", "--out", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["num_samples"] == 5 and metrics["feature_network"].startswith("digits")
    assert np.isfinite(metrics["digits_fid"]) and 0 <= metrics["class_agreement"] <= 1


def test_bench_prints_the_parts_of_two_mar_folders(folders, tmp_path, capsys):
    js = tmp_path / "bench.json"
    assert main(["bench", str(folders / "full"), str(folders / "pruned"), "--sampling-steps", "4", "--head-steps", "3",
                 "--cfg-scale", "2", "--rounds", "2", "--warmup", "0", "--no-memory", "--json", str(js)]) == 0
    printed = capsys.readouterr().out
    assert "| model | blocks (enc + dec) |" in printed and "in blocks" in printed and "speed-up, blocks" in printed
    assert "| 2 + 2 |" in printed and "| 1 + 1 |" in printed and "4 iterations, 3 head DDPM steps" in printed
    rows = json.loads(js.read_text())["rows"]
    assert [r["depth"] for r in rows] == [4, 2] and rows[0]["speedup"] == 1.0
    for r in rows:
        assert r["blocks_s"] + r["head_s"] + r["rest_s"] == pytest.approx(r["seconds_per_image"])
    assert "bench them in separate runs" in one_line_error(["bench", str(folders / "full"), "DiT-S/2:depth=1", "--no-memory"], capsys)
    assert "--trajectory applies to DiT/SiT" in one_line_error(["bench", str(folders / "full"), "--trajectory", "4"], capsys)
    assert "--head-steps applies to MAR models only" in one_line_error(["bench", "DiT-S/2:depth=1", "--head-steps", "3"], capsys)


def test_info_shows_the_encoder_decoder_and_head(folders, capsys):
    assert main(["info", str(folders / "pruned")]) == 0
    printed = capsys.readouterr().out
    assert "MAR, 2 blocks: encoder 1 (hidden 32, 2 heads) + decoder 1 (hidden 32, 2 heads)" in printed
    assert "diffusion MLP: 2 residual blocks of width 32" in printed and "16 tokens + 4 buffer" in printed
    assert "(encoder_blocks [0], decoder_blocks [1])" in printed
    assert main(["info", str(folders / "full"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    mar = info["mar"]
    assert sum(mar["parameters"].values()) == info["parameters"]
    assert mar["generation"]["macs_per_image"] == mar_generation_macs(leandit.load_model(folders / "full"), 1, num_iter=16)
    assert info["flops_per_forward"] > 0
    assert main(["info", TINY_SPEC]) == 0  # a named size on the meta device
    assert "encoder 2 (hidden 32" in capsys.readouterr().out


def test_head_spacings_as_counts_strides_or_sections():
    from leandit.diffusion.masked import head_spacing, head_step_count

    assert head_spacing("100", 1000) == 100 and head_spacing(25, 1000) == 25
    assert head_spacing("ddim50", 1000) == "ddim50" and head_step_count("ddim50", 1000) == 50
    assert head_step_count("10,20", 1000) == 30
    # a stride spacing runs the head on 980, 960, ..., 0 (the digits teacher's), a count from 999
    process = MaskedDiffusion(2, 1).head.respaced(head_spacing("ddim50", 1000))
    assert process.timestep_map == list(range(0, 1000, 20))
    assert MaskedDiffusion(2, 1).head.respaced(head_spacing("100", 1000)).timestep_map[-1] == 999
    model = tiny_mar()
    with torch.no_grad():
        a = leandit.backbones.backbone(model).generate(torch.tensor([1]), PerSampleNoise(0, [0]), num_iter=2, head_steps="ddim5")
        b = leandit.backbones.backbone(model).generate(torch.tensor([1]), PerSampleNoise(0, [0]), num_iter=2, head_steps=5)
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_masked_tokens_cast_with_a_dtype_alone_and_keep_their_integer_parts():
    from leandit.diffusion.masked import MaskedTokens

    inputs = MaskedTokens(torch.zeros(2, 4, 3), torch.zeros(2, 4, dtype=torch.bool), torch.zeros(2, 5, dtype=torch.long),
                          torch.zeros(2, 5, 3))
    cast = inputs.to(torch.float64)  # as Tensor.to(dtype): not taken for a device
    assert cast.tokens.dtype == cast.noisy.dtype == torch.float64
    assert cast.mask.dtype == torch.bool and cast.index.dtype == torch.long
    assert inputs.to("cpu", torch.float16).tokens.dtype == torch.float16


def test_the_kl_of_two_equal_gaussians_is_exactly_zero():
    from leandit.diffusion.gaussian import normal_kl

    mean = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    logvar = torch.randn(1000, generator=torch.Generator().manual_seed(1)) * 3
    assert torch.equal(normal_kl(mean, logvar, mean, logvar), torch.zeros(1000))
