"""extract_features and `leandit extract-features` with a tiny random VAE on generated images."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from leandit.commands import extract_features as command
from leandit.data import features
from leandit.data import latents as fmt
from leandit.data.features import extract_features
from leandit.data.latents import LatentShardDataset
from leandit.diffusion.noise import mix_seed

from conftest import run_cli

RES = 32
# (class, relative path, PIL mode, (width, height)): every format, case and mode the walker must
# take, sizes above 2x the resolution (BOX halving) and below it (upscaling).
IMAGES = [
    ("cat", "a.jpg", "RGB", (90, 70)),
    ("cat", "B.PNG", "RGBA", (33, 40)),
    ("cat", "sub/c.webp", "RGB", (30, 20)),
    ("cat", "d.bmp", "L", (64, 48)),
    ("cat", "e.JPEG", "RGB", (64, 64)),
    ("dog", "x.png", "P", (50, 33)),
    ("dog", "y.jpg", "RGB", (40, 100)),
    ("dog", "z.webp", "RGB", (32, 32)),
    ("dog", "deep/er/w.bmp", "RGB", (45, 50)),
    ("dog", "v.jpeg", "RGB", (80, 36)),
]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    from tiny_pipeline import tiny_vae  # the same 2-level VAE the tiny PixArt pipeline uses

    vae = tiny_vae(seed=0)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for cls, rel, mode, (w, h) in IMAGES:
        path = root / cls / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        image = image.quantize(16) if mode == "P" else image.convert(mode)
        fmt_name = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP"}[path.suffix.lower()]
        image.save(path, format=fmt_name, **({"lossless": True} if fmt_name == "WEBP" else {}))
    # Things the walker must skip: a macOS resource fork, a hidden folder, a non-image.
    (root / "cat" / "._a.jpg").write_bytes(b"\x00\x05\x16\x07 not an image")
    (root / "dog" / ".cache").mkdir()
    (root / "dog" / ".cache" / "q.jpg").write_bytes(b"junk")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def extracted(image_root, vae_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("latents")
    summary = extract_features(image_root, vae_dir, out, resolution=RES, shard_size=4, batch_size=3, seed=7, device="cpu", progress=False)
    return out, summary


def expected_files(root: Path) -> list[tuple[Path, int]]:
    """The global order, computed independently: classes sorted, then paths within a class."""
    order = []
    for label, cls in enumerate(sorted({c for c, *_ in IMAGES})):
        order += [(root / cls / rel, label) for rel in sorted(r for c, r, *_ in IMAGES if c == cls)]
    return order


def adm_center_crop(path: Path, size: int) -> np.ndarray:
    """The center crop of ADM's image_datasets.py, as DiT uses it."""
    pil = Image.open(path).convert("RGB")
    while min(*pil.size) >= 2 * size:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
    scale = size / min(*pil.size)
    pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
    arr = np.array(pil)
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y : y + size, x : x + size]


@torch.no_grad()
def reference_latent(vae, path: Path, index: int, variant: int, seed: int) -> torch.Tensor:
    arr = adm_center_crop(path, RES)
    if variant:
        arr = np.ascontiguousarray(arr[:, ::-1])
    x = torch.from_numpy(arr).permute(2, 0, 1).float()[None] / 127.5 - 1
    dist = vae.encode(x).latent_dist
    noise = torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(mix_seed(seed, index, variant)))
    return ((dist.mean[0] + dist.std[0] * noise) * 0.18215).float()


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_shards_hold_the_independently_computed_latents(extracted, image_root, vae_dir):
    from diffusers import AutoencoderKL

    out, summary = extracted
    assert summary["images"] == 10 and summary["shards_written"] == 3 and summary["shards_skipped"] == 0
    assert summary["complete"] and summary["num_shards"] == 3
    assert sorted(p.name for p in out.iterdir()) == ["index.json"] + [f"shard-0000{k}.safetensors" for k in range(3)]
    meta = fmt.read_index(out)
    assert meta["latent_shape"] == [4, RES // 2, RES // 2] and meta["variants"] == 2 and meta["flip"] is True
    assert meta["class_names"] == ["cat", "dog"] and meta["num_classes"] == 2 and meta["num_images"] == 10
    assert meta["scale_factor"] == 0.18215 and meta["dtype"] == "float16" and meta["shard_size"] == 4
    assert meta["resolution"] == RES and meta["vae"] == str(vae_dir.resolve())

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    order = expected_files(image_root)
    for k, rows in enumerate([range(0, 4), range(4, 8), range(8, 10)]):
        shard = load_file(out / f"shard-{k:05d}.safetensors")
        assert shard["latents"].shape == (len(rows), 2, 4, RES // 2, RES // 2) and shard["latents"].dtype == torch.float16
        assert shard["indices"].tolist() == list(rows)
        assert shard["labels"].tolist() == [order[i][1] for i in rows]
        for r, i in enumerate(rows):
            for v in (0, 1):  # v = 1: the encoding of the flipped image, with its own noise
                ref = reference_latent(vae, order[i][0], i, v, seed=7)
                torch.testing.assert_close(shard["latents"][r, v].float(), ref, atol=2e-3, rtol=2e-3)
    image0, flip0 = load_file(out / "shard-00000.safetensors")["latents"][0].float()
    assert not torch.allclose(image0, flip0, atol=1e-2)


def test_reader_serves_the_extracted_folder(extracted):
    out, _ = extracted
    ds = LatentShardDataset(out)
    assert len(ds) == 20 and ds.latent_shape == (4, RES // 2, RES // 2) and ds.class_names == ["cat", "dog"]
    shard = load_file(out / "shard-00001.safetensors")
    x, y = ds[2 * 5 + 1]  # image 5 = row 1 of shard 1, flipped variant
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    torch.testing.assert_close(x, shard["latents"][1, 1].float())
    assert int(y) == int(shard["labels"][1]) == 1


def test_two_processes_write_the_same_files_once(extracted, image_root, vae_dir, tmp_path, monkeypatch):
    written = []
    real_write = fmt.write_shard
    monkeypatch.setattr(fmt, "write_shard", lambda folder, k, *a: written.append(k) or real_write(folder, k, *a))
    kwargs = dict(resolution=RES, shard_size=4, batch_size=3, seed=7, device="cpu", progress=False)

    # rank 1 from torchrun's variables, and first: it must not need rank 0's index.json
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    s1 = extract_features(image_root, vae_dir, tmp_path, **kwargs)
    assert written == [1] and not (tmp_path / "index.json").exists() and not s1["complete"]
    with pytest.raises(FileNotFoundError, match="no index.json"):
        LatentShardDataset(tmp_path)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    s0 = extract_features(image_root, vae_dir, tmp_path, rank=0, world_size=2, **kwargs)
    assert written == [1, 0, 2] and s0["complete"] and s0["shards_written"] == 2 and s1["shards_written"] == 1
    assert file_bytes(tmp_path) == file_bytes(extracted[0])


def test_latents_do_not_depend_on_the_batch_size(extracted, image_root, vae_dir, tmp_path):
    extract_features(image_root, vae_dir, tmp_path, resolution=RES, shard_size=4, batch_size=8, seed=7, device="cpu", progress=False)
    for k in range(3):
        a = load_file(tmp_path / f"shard-{k:05d}.safetensors")
        b = load_file(extracted[0] / f"shard-{k:05d}.safetensors")
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name].float(), b[name].float(), atol=1e-3, rtol=1e-3)


def test_resume_rewrites_only_the_missing_shard(extracted, image_root, vae_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(extracted[0], out)
    (out / "shard-00001.safetensors").unlink()
    (out / ".shard-00001.safetensors.999.dead.tmp").write_bytes(b"left by a killed run")
    with pytest.raises(FileNotFoundError, match="1 of 3 shards are missing.*rerun 'leandit extract-features'"):
        LatentShardDataset(out)
    before = {k: os.stat(out / f"shard-{k:05d}.safetensors").st_mtime_ns for k in (0, 2)}
    kwargs = dict(resolution=RES, shard_size=4, batch_size=3, seed=7, device="cpu", progress=False)
    summary = extract_features(image_root, vae_dir, out, **kwargs)
    assert (summary["images"], summary["shards_written"], summary["shards_skipped"]) == (4, 1, 2)
    assert {k: os.stat(out / f"shard-{k:05d}.safetensors").st_mtime_ns for k in (0, 2)} == before
    assert (out / "shard-00001.safetensors").read_bytes() == (extracted[0] / "shard-00001.safetensors").read_bytes()
    assert len(LatentShardDataset(out)) == 20

    # a complete folder: nothing to do, and the VAE's weights are not even loaded
    monkeypatch.setattr(features, "load_vae", lambda *a: pytest.fail("loaded the VAE with nothing to encode"))
    summary = extract_features(image_root, vae_dir, out, **kwargs)
    assert (summary["images"], summary["shards_written"], summary["shards_skipped"]) == (0, 0, 3)


def test_resume_refuses_other_settings(extracted, image_root, vae_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(extracted[0], out)
    with pytest.raises(ValueError, match=r"other settings \(seed differ\).*new --out"):
        extract_features(image_root, vae_dir, out, resolution=RES, shard_size=4, seed=8, progress=False)
    with pytest.raises(ValueError, match=r"other settings \(variants, flip differ\)"):
        extract_features(image_root, vae_dir, out, resolution=RES, shard_size=4, seed=7, flip=False, progress=False)


def test_no_flip_float32(image_root, vae_dir, tmp_path):
    from diffusers import AutoencoderKL

    summary = extract_features(image_root, vae_dir, tmp_path, resolution=RES, shard_size=16, flip=False, dtype="float32",
                               seed=3, device="cpu", progress=False)
    assert summary["shards_written"] == 1
    shard = load_file(tmp_path / "shard-00000.safetensors")
    assert shard["latents"].shape == (10, 1, 4, RES // 2, RES // 2) and shard["latents"].dtype == torch.float32
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    path = expected_files(image_root)[6][0]
    torch.testing.assert_close(shard["latents"][6, 0], reference_latent(vae, path, 6, 0, seed=3), atol=1e-5, rtol=1e-4)
    assert len(LatentShardDataset(tmp_path)) == 10


def test_clear_errors(image_root, vae_dir, tmp_path):
    run = lambda root=image_root, vae=vae_dir, **kw: extract_features(root, vae, tmp_path / "out", resolution=RES, progress=False, **kw)
    with pytest.raises(FileNotFoundError, match=r"no VAE at .*missing-vae: pass a local diffusers AutoencoderKL folder.*save_pretrained"):
        run(vae=tmp_path / "missing-vae")
    (tmp_path / "not-a-vae").mkdir()
    (tmp_path / "not-a-vae" / "config.json").write_text('{"_class_name": "UNet2DModel", "sample_size": 8}')
    with pytest.raises(ValueError, match="not an AutoencoderKL folder"):
        run(vae=tmp_path / "not-a-vae")
    with pytest.raises(FileNotFoundError, match="no image folder at .*ImageNet layout"):
        run(root=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders in .*empty.*ImageNet layout"):
        run(root=tmp_path / "empty")
    (tmp_path / "empty" / "cls").mkdir()
    (tmp_path / "empty" / "cls" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no images .*jpg.*ImageNet layout"):
        run(root=tmp_path / "empty")
    with pytest.raises(ValueError, match="not a multiple of the VAE's downsampling factor 2"):
        extract_features(image_root, vae_dir, tmp_path / "out", resolution=31, progress=False)
    with pytest.raises(ValueError, match="rank 2 of 2"):
        run(rank=2, world_size=2)
    with pytest.raises(ValueError, match="dtype must be one of float16, float32"):
        run(dtype="bfloat16")
    bad = tmp_path / "bad"
    shutil.copytree(image_root, bad)
    (bad / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ValueError, match="cannot read image .*broken.jpg.*remove or replace it"):
        run(root=bad)


def test_command_parser_and_run(image_root, vae_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="leandit")
    command.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["extract-features", str(image_root), "--vae", str(vae_dir), "--out", str(tmp_path),
                              "--resolution", str(RES), "--shard-size", "6", "--no-flip", "--dtype", "float32", "--quiet"])
    assert (args.batch_size, args.seed, args.device, args.no_flip, args.shard_size) == (32, 0, "auto", True, 6)
    assert args.run(args) == 0
    line = capsys.readouterr().out.strip()
    assert "encoded 10 images into 2 shards" in line and "complete" in line and "\n" not in line
    assert len(LatentShardDataset(tmp_path)) == 10
    args.batch_size = 0
    with pytest.raises(ValueError, match="batch size must be at least 1"):
        args.run(args)


def test_cli_as_a_user_runs_it(image_root, vae_dir, tmp_path):
    out = tmp_path / "latents"
    done = run_cli("extract-features", str(image_root), "--vae", str(vae_dir), "--out", str(out),
                   "--resolution", str(RES), "--shard-size", "4", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "encoded 10 images into 3 shards" in done.stdout and "(complete)" in done.stdout
    assert len(LatentShardDataset(out)) == 20


def test_cli_help_and_errors(image_root, tmp_path, capsys):
    # in-process (the subprocess start-up is the slow part): the same parser and error path
    from leandit import cli

    with pytest.raises(SystemExit) as exit_help:
        cli.main(["extract-features", "--help"])
    assert exit_help.value.code == 0
    shown = capsys.readouterr().out
    for option in ("--vae", "--out", "--resolution", "--shard-size", "--batch-size", "--no-flip", "--dtype", "--seed",
                   "--device", "--quiet", "image_root"):
        assert option in shown

    assert cli.main(["extract-features", str(image_root), "--vae", str(tmp_path / "no-vae"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("leandit extract-features: error: no VAE at") and "\n" not in err


def test_latent_pipeline_extract_train_sample(vae_dir, image_root, tmp_path):
    """A user's real-data path end to end: images -> latent shards -> train a latent DiT ->
    sample it and decode with the same VAE into RGB images."""
    from leandit.cli import main

    shards = tmp_path / "latents"
    assert main(["extract-features", str(image_root), "--vae", str(vae_dir), "--out", str(shards),
                 "--resolution", str(RES), "--shard-size", "4", "--quiet", "--device", "cpu"]) == 0
    run = tmp_path / "run"
    assert main(["train", "--model", "DiT-S/2", "--set", "input_size=16", "--set", "in_channels=4", "--set", "hidden_size=32",
                 "--set", "num_heads=2", "--set", "depth=1", "--set", "num_classes=2", "--data", str(shards),
                 "--steps", "2", "--batch-size", "4", "--device", "cpu", "--out", str(run), "--quiet"]) == 0
    samples = tmp_path / "samples"
    assert main(["sample", str(run / "model"), "--vae", str(vae_dir), "--num-samples", "3", "--steps", "2", "--device", "cpu",
                 "--out", str(samples), "--quiet"]) == 0
    with np.load(samples / "samples.npz") as f:
        assert f["arr_0"].shape == (3, RES, RES, 3) and f["arr_0"].dtype == np.uint8
        assert f["arr_1"].tolist() == [0, 1, 0]


def test_resume_with_another_vae_of_the_same_shape_is_refused(vae_dir, image_root, tmp_path):
    """sd-vae-ft-ema and sd-vae-ft-mse share config and shapes: a resume must not mix them."""
    from diffusers import AutoencoderKL

    out = tmp_path / "latents"
    extract_features(image_root, vae_dir, out, resolution=RES, shard_size=4, device="cpu", progress=False)
    other = AutoencoderKL.from_pretrained(str(vae_dir))
    with torch.no_grad():
        other.decoder.conv_out.bias.add_(0.5)  # another fine-tune of the same architecture
    other_dir = tmp_path / "other-vae"
    other.save_pretrained(other_dir)
    (out / fmt.shard_name(1)).unlink()
    with pytest.raises(ValueError, match="vae_sha256"):
        extract_features(image_root, other_dir, out, resolution=RES, shard_size=4, device="cpu", progress=False)
