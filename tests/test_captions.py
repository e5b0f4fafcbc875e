"""Captioned extraction (latents + PixArt prompt embeddings), the text-conditioned data set,
and `leandit encode-prompts`, on a tiny PixArt pipeline folder built in the test."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from leandit.data import features, open_training_data
from leandit.data import latents as fmt
from leandit.data import text as text_mod
from leandit.data.features import extract_features
from leandit.data.latents import LatentShardDataset
from leandit.data.text import PromptEncoder, captioned_images, encode_prompts, load_prompt_embeddings
from leandit.diffusion.noise import mix_seed

from tiny_pipeline import TEXT_DIM, build_tiny_pipeline

RES = 16  # the tiny VAE halves it: 8x8 latents, the tiny transformer's sample_size
L = 120  # PixArtAlphaPipeline's prompt length
# (relative path, caption): a flat and nested folder, captions with capitals, spaces and
# words outside the tokenizer's vocabulary.
CAPTIONS = {
    "a.png": "A red dog on a sofa",
    "b.jpg": "the cat",
    "sub/c.webp": "  a small blue house  ",
    "sub/deep/d.bmp": "a picture of a tree with zebras",
    "e.png": "",
}
ORDER = sorted(CAPTIONS)  # the global image order: sorted relative paths


def pixart():
    from diffusers import PixArtAlphaPipeline

    return PixArtAlphaPipeline


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("pipeline") / "pixart")


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("captioned")
    rng = np.random.default_rng(1)
    for n, rel in enumerate(ORDER):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(rng.integers(0, 256, (20 + 3 * n, 24, 3), dtype=np.uint8))
        kind = {".png": "PNG", ".jpg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}[path.suffix]
        image.save(path, format=kind, **({"lossless": True} if kind == "WEBP" else {}))
        path.with_suffix(".txt").write_text(CAPTIONS[rel] + "\n")  # the .txt captions (stripped on reading)
    (root / "._a.png").write_bytes(b"resource fork, not an image")
    return root


@pytest.fixture(scope="module")
def caption_files(image_root, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("caption-files")
    as_json = folder / "captions.json"
    as_json.write_text(json.dumps({**CAPTIONS, "gone.png": "an image that is not there"}))
    as_jsonl = folder / "metadata.jsonl"
    as_jsonl.write_text("".join(json.dumps({"file_name": "./" + k, "text": v}) + "\n" for k, v in CAPTIONS.items()))
    return {"json": as_json, "jsonl": as_jsonl}


KW = dict(resolution=RES, shard_size=2, batch_size=3, seed=5, device="cpu", progress=False)


@pytest.fixture(scope="module")
def extracted(image_root, pipeline_dir, caption_files, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("text-latents")
    summary = extract_features(image_root, None, out, pipeline=pipeline_dir, captions=caption_files["json"], **KW)
    return out, summary


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@torch.no_grad()
def reference_latent(vae, path: Path, index: int, variant: int) -> torch.Tensor:
    """The VAE encode by hand: ADM crop (the images are below 2x the size: one BICUBIC resize)."""
    pil = Image.open(path).convert("RGB")
    scale = RES / min(pil.size)
    pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
    arr = np.array(pil)
    y, x = (arr.shape[0] - RES) // 2, (arr.shape[1] - RES) // 2
    arr = arr[y : y + RES, x : x + RES]
    if variant:
        arr = np.ascontiguousarray(arr[:, ::-1])
    image = torch.from_numpy(arr).permute(2, 0, 1).float()[None] / 127.5 - 1
    dist = vae.encode(image).latent_dist
    noise = torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(mix_seed(5, index, variant)))
    return ((dist.mean[0] + dist.std[0] * noise) * vae.config.scaling_factor).float()


def test_tiny_pipeline_loads_and_samples_offline(pipeline_dir):
    pipe = pixart().from_pretrained(pipeline_dir, local_files_only=True)
    assert type(pipe.tokenizer).__name__ == "T5Tokenizer" and pipe.text_encoder.config.d_model == TEXT_DIM
    ids = pipe.tokenizer("a red dog").input_ids
    assert ids[-1] == pipe.tokenizer.eos_token_id == 1 and pipe.tokenizer.unk_token_id not in ids
    out = pipe("a red dog", num_inference_steps=2, height=RES, width=RES, output_type="latent",
               use_resolution_binning=False, generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 4, RES // 2, RES // 2) and torch.isfinite(out.images).all()


def test_captioned_shards_hold_the_vae_latents_and_the_pipeline_embeddings(extracted, image_root, pipeline_dir):
    out, summary = extracted
    assert (summary["conditioning"], summary["images"], summary["shards_written"], summary["complete"]) == ("text", 5, 3, True)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["index.json", fmt.NULL_TEXT_FILE] + [fmt.shard_name(k) for k in range(3)]
    meta = fmt.read_index(out)
    assert meta["conditioning"] == "text" and meta["pipeline_class"] == "PixArtAlphaPipeline"
    assert meta["max_length"] == L and meta["text_shape"] == [L, TEXT_DIM] and meta["null_text"] == fmt.NULL_TEXT_FILE
    assert meta["pipeline"] == str(pipeline_dir.resolve()) and meta["vae"] == str((pipeline_dir / "vae").resolve())
    assert len(meta["text_encoder_sha256"]) == 16 and len(meta["tokenizer_sha256"]) == 16 and "class_names" not in meta
    assert meta["num_images"] == 5 and meta["latent_shape"] == [4, RES // 2, RES // 2] and meta["scale_factor"] == 0.18215

    pipe = pixart().from_pretrained(pipeline_dir, local_files_only=True)
    texts = [CAPTIONS[rel] for rel in ORDER]
    embeds, mask, null, null_mask = pipe.encode_prompt(texts, device="cpu")  # the pipeline's own, with guidance
    assert embeds.shape == (5, L, TEXT_DIM)
    for k, rows in enumerate([range(0, 2), range(2, 4), range(4, 5)]):
        shard = load_file(out / fmt.shard_name(k))
        assert sorted(shard) == ["indices", "latents", "text", "text_mask"]
        assert shard["text"].dtype == torch.float16 and shard["text_mask"].dtype == torch.int64
        assert shard["indices"].tolist() == list(rows)
        assert fmt.shard_captions(out / fmt.shard_name(k)) == [texts[i] for i in rows]
        torch.testing.assert_close(shard["text"].float(), embeds[list(rows)], atol=2e-3, rtol=2e-3)
        assert torch.equal(shard["text_mask"], mask[list(rows)])
        for r, i in enumerate(rows):
            for v in (0, 1):
                ref = reference_latent(pipe.vae, image_root / ORDER[i], i, v)
                torch.testing.assert_close(shard["latents"][r, v].float(), ref, atol=2e-3, rtol=2e-3)
    # masks: one token per word of the lower-cased, stripped caption, + </s>; "zebras" is not in
    # the vocabulary: a bare "▁" piece and one <unk>
    assert mask.sum(1).tolist() == [7, 3, 1, 5, 9]
    null_file = load_file(out / fmt.NULL_TEXT_FILE)
    torch.testing.assert_close(null_file["text"].float(), null[0], atol=2e-3, rtol=2e-3)
    assert torch.equal(null_file["text_mask"], null_mask[0]) and null_mask[0].tolist() == [1] + [0] * (L - 1)
    # the empty caption "" is the null prompt: what dropout replaces a caption with is what "" gives
    torch.testing.assert_close(load_file(out / fmt.shard_name(1))["text"][0], null_file["text"])  # e.png


def test_dataset_serves_text_conditions(extracted):
    out, _ = extracted
    ds = open_training_data(str(out))
    assert isinstance(ds, LatentShardDataset) and ds.conditioning == "text" and len(ds) == 10
    assert ds.num_classes is None and ds.class_names is None and ds.text_shape == (L, TEXT_DIM)
    shard = load_file(out / fmt.shard_name(1))
    x, cond = ds[2 * 3 + 1]  # image 3 = row 1 of shard 1, flipped variant
    assert x.dtype == torch.float32 and x.shape == (4, RES // 2, RES // 2)
    torch.testing.assert_close(x, shard["latents"][1, 1].float())
    assert set(cond) == {"text", "text_mask"} and cond["text"].dtype == torch.float32 and cond["text_mask"].dtype == torch.int64
    torch.testing.assert_close(cond["text"], shard["text"][1].float())
    assert torch.equal(cond["text_mask"], shard["text_mask"][1]) and torch.equal(ds[6][1]["text"], cond["text"])
    assert ds.caption(7) == CAPTIONS[ORDER[3]]
    null = ds.null_condition
    assert null["text"].shape == (L, TEXT_DIM) and null["text"].dtype == torch.float32 and null["text_mask"].dtype == torch.int64
    torch.testing.assert_close(null["text"], load_file(out / fmt.NULL_TEXT_FILE)["text"].float())
    xs, conds = next(iter(DataLoader(ds, batch_size=4, sampler=[9, 0, 5, 2], num_workers=1)))
    assert xs.shape == (4, 4, RES // 2, RES // 2) and conds["text"].shape == (4, L, TEXT_DIM) and conds["text_mask"].shape == (4, L)
    torch.testing.assert_close(conds["text"][2], ds[5][1]["text"])
    assert "text (120, 16)" in repr(ds)


def test_class_label_folders_say_so(tmp_path):
    meta = {"format": fmt.FORMAT, "version": fmt.VERSION, "latent_shape": [4, 2, 2], "variants": 1, "flip": False,
            "dtype": "float32", "shard_size": 2, "num_images": 2, "num_shards": 1, "num_classes": 3,
            "class_names": ["a", "b", "c"], "scale_factor": 0.18215, "resolution": 4, "seed": 0}
    fmt.write_index(tmp_path, meta)
    fmt.write_shard(tmp_path, 0, torch.zeros(2, 1, 4, 2, 2), torch.tensor([0, 2]), torch.arange(2), meta)
    ds = LatentShardDataset(tmp_path)
    assert ds.conditioning == "class" and ds.null_condition is None and ds.num_classes == 3
    assert ds[1][1].dtype == torch.int64 and int(ds[1][1]) == 2
    with pytest.raises(ValueError, match="holds class labels, not captions"):
        ds.caption(0)


def test_class_label_settings_hash_is_unchanged():
    """Folders extracted before captions existed must stay readable: their settings hash is
    the hash of SETTINGS_FIELDS alone, without the caption fields."""
    import hashlib

    meta = {"format": fmt.FORMAT, "version": 1, "latent_shape": [4, 32, 32], "seed": 0, "vae_sha256": "ab" * 8}
    old = hashlib.sha256(json.dumps({k: meta.get(k) for k in fmt.SETTINGS_FIELDS}, sort_keys=True).encode()).hexdigest()[:16]
    assert fmt.settings_id(meta) == old
    assert fmt.settings_id({**meta, "conditioning": "text"}) != old


def test_caption_sources_agree(extracted, image_root, pipeline_dir, caption_files, tmp_path, monkeypatch):
    paths, texts, classes = captioned_images(image_root, caption_files["json"])
    assert [p.relative_to(image_root).as_posix() for p in paths] == ORDER and classes is None
    assert captioned_images(image_root, caption_files["jsonl"])[1] == texts
    assert captioned_images(image_root, "txt")[1] == [t.strip() for t in texts]
    # the same captions from .txt files decide the same content: a resume from them has nothing to do
    clean = {k: v.strip() for k, v in CAPTIONS.items()}
    (tmp_path / "strip.json").write_text(json.dumps(clean))
    out = tmp_path / "from-json"
    extract_features(image_root, None, out, pipeline=pipeline_dir, captions=tmp_path / "strip.json", **KW)
    monkeypatch.setattr(features, "load_vae", lambda *a: pytest.fail("loaded the VAE with nothing to encode"))
    again = extract_features(image_root, None, out, pipeline=pipeline_dir, captions="txt", **KW)
    assert (again["images"], again["shards_skipped"]) == (0, 3)


def test_resume_skips_complete_shards_and_refuses_other_captions_or_encoder(
    extracted, image_root, pipeline_dir, caption_files, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    shutil.copytree(extracted[0], out)
    (out / fmt.shard_name(1)).unlink()
    with pytest.raises(FileNotFoundError, match="1 of 3 shards are missing"):
        LatentShardDataset(out)
    before = {k: os.stat(out / fmt.shard_name(k)).st_mtime_ns for k in (0, 2)}
    summary = extract_features(image_root, None, out, pipeline=pipeline_dir, captions=caption_files["json"], **KW)
    assert (summary["images"], summary["shards_written"], summary["shards_skipped"]) == (2, 1, 2)
    assert {k: os.stat(out / fmt.shard_name(k)).st_mtime_ns for k in (0, 2)} == before
    assert file_bytes(out) == file_bytes(extracted[0])

    # a complete folder: neither the VAE nor the text encoder is loaded
    monkeypatch.setattr(features, "load_vae", lambda *a: pytest.fail("loaded the VAE with nothing to encode"))
    monkeypatch.setattr(features, "PromptEncoder", lambda *a, **k: pytest.fail("loaded the text encoder with nothing to encode"))
    summary = extract_features(image_root, None, out, pipeline=pipeline_dir, captions=caption_files["json"], **KW)
    assert (summary["images"], summary["shards_skipped"]) == (0, 3)

    (out / fmt.shard_name(2)).unlink()
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**CAPTIONS, "b.jpg": "the black cat"}))
    with pytest.raises(ValueError, match=r"other settings \(captions_sha256 differ\).*new --out"):
        extract_features(image_root, None, out, pipeline=pipeline_dir, captions=other, **KW)
    with pytest.raises(ValueError, match=r"other settings \(max_length, text_shape differ\)"):
        extract_features(image_root, None, out, pipeline=pipeline_dir, captions=caption_files["json"], max_length=64, **KW)
    # another fine-tune of the same text encoder: same config, same shapes, other weights
    tuned = tmp_path / "tuned"
    shutil.copytree(pipeline_dir, tuned)
    for part in ("text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        weights = {name: w + 0.01 for name, w in load_file(tuned / part).items()}
        save_file(weights, tuned / part, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"\(text_encoder_sha256 differ\)"):
        extract_features(image_root, pipeline_dir / "vae", out, pipeline=tuned, captions=caption_files["json"], **KW)
    # --vae overrides the pipeline's vae/, and is part of what decides the content
    with pytest.raises(ValueError, match=r"\(vae_sha256 differ\)"):
        extract_features(image_root, tuned / "vae", out, pipeline=pipeline_dir, captions=caption_files["json"], **KW)


def test_two_processes_write_the_same_shards_as_one(extracted, image_root, pipeline_dir, caption_files, tmp_path, monkeypatch):
    written = []
    real_write = fmt.write_text_shard
    monkeypatch.setattr(fmt, "write_text_shard", lambda folder, k, *a: written.append(k) or real_write(folder, k, *a))
    kwargs = dict(pipeline=pipeline_dir, captions=caption_files["json"], **KW)
    # rank 1 from torchrun's variables, and first: it needs neither index.json nor the null text
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    s1 = extract_features(image_root, None, tmp_path, **kwargs)
    assert written == [1] and sorted(p.name for p in tmp_path.iterdir()) == [fmt.shard_name(1)] and not s1["complete"]
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    s0 = extract_features(image_root, None, tmp_path, rank=0, world_size=2, **kwargs)
    assert written == [1, 0, 2] and s0["complete"] and s0["shards_written"] == 2
    assert file_bytes(tmp_path) == file_bytes(extracted[0])


def test_class_names_are_captions(pipeline_dir, tmp_path):
    root = tmp_path / "digits"
    for n, name in enumerate(["seven", "red_dog", "three"]):
        (root / name).mkdir(parents=True)
        for i in range(2 if n else 1):
            Image.fromarray(np.full((RES, RES, 3), 40 * n + i, dtype=np.uint8)).save(root / name / f"{i}.png")
    out = tmp_path / "out"
    extract_features(root, pipeline_dir / "vae", out, pipeline=pipeline_dir, captions="class-names", flip=False, **KW)
    ds = LatentShardDataset(out)
    assert ds.conditioning == "text" and ds.class_names == ["red_dog", "seven", "three"] and ds.num_classes is None
    assert [ds.caption(i) for i in range(len(ds))] == ["red dog", "red dog", "seven", "three", "three"]
    assert fmt.read_index(out)["captions"] == "class-names"
    encoder = PromptEncoder(pipeline_dir)
    embeds, mask = encoder.encode(["red dog", "seven"])
    torch.testing.assert_close(ds[1][1]["text"], embeds[0], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(ds[2][1]["text"], embeds[1], atol=2e-3, rtol=2e-3)
    assert ds[2][1]["text_mask"].tolist() == mask[1].tolist() == [1, 1] + [0] * (L - 2)
    with pytest.raises(ValueError, match="no class sub-folders"):
        extract_features(root / "seven", None, tmp_path / "o2", pipeline=pipeline_dir, captions="class-names", **KW)


def test_encode_prompts_file_round_trip(pipeline_dir, extracted, tmp_path, capsys, monkeypatch):
    from leandit import cli

    if "encode-prompts" not in cli.COMMANDS:  # the main session adds it on merging
        monkeypatch.setattr(cli, "COMMANDS", cli.COMMANDS + ("encode-prompts",))
    listing = tmp_path / "prompts.txt"
    listing.write_text("a red dog\n\n  The cat on a sofa \n")
    out = tmp_path / "emb" / "prompts.safetensors"
    assert cli.main(["encode-prompts", "--pipeline", str(pipeline_dir), "--prompts", str(listing), "seven",
                     "--out", str(out), "--batch-size", "2", "--device", "cpu"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("encode-prompts: 3 prompts and the empty prompt") and "\n" not in line
    got = load_prompt_embeddings(out)
    assert set(got) == {"text", "text_mask", "null_text", "null_text_mask", "prompts", "meta"}
    assert got["prompts"] == ["a red dog", "The cat on a sofa", "seven"]
    assert got["text"].shape == (3, L, TEXT_DIM) and got["text"].dtype == torch.float32 and got["text_mask"].dtype == torch.int64
    assert got["null_text"].shape == (L, TEXT_DIM) and got["null_text_mask"].shape == (L,)
    pipe = pixart().from_pretrained(pipeline_dir, local_files_only=True)
    embeds, mask, null, null_mask = pipe.encode_prompt(got["prompts"], device="cpu")
    torch.testing.assert_close(got["text"], embeds, atol=1e-5, rtol=1e-5)
    assert torch.equal(got["text_mask"], mask) and torch.equal(got["null_text_mask"], null_mask[0])
    torch.testing.assert_close(got["null_text"], null[0], atol=1e-5, rtol=1e-5)
    index = fmt.read_index(extracted[0])
    for field in ("text_encoder_sha256", "tokenizer_sha256", "max_length", "text_shape", "pipeline_class", "pipeline"):
        assert got["meta"][field] == index[field]
    # the training data's null text is the prompt file's (up to float16 storage)
    torch.testing.assert_close(LatentShardDataset(extracted[0]).null_condition["text"], got["null_text"], atol=2e-3, rtol=2e-3)

    (tmp_path / "list.json").write_text(json.dumps(["one", "two"]))
    meta = encode_prompts(pipeline_dir, text_mod.read_prompts([str(tmp_path / "list.json")]), tmp_path / "b.safetensors",
                          dtype="float16", device="cpu")
    assert meta["prompts"] == ["one", "two"] and load_file(tmp_path / "b.safetensors")["text"].dtype == torch.float16


def test_sigma_pipeline_prompts_have_300_tokens(tmp_path):
    from diffusers import PixArtSigmaPipeline

    folder = build_tiny_pipeline(tmp_path / "sigma", kind="sigma", seed=3)
    encoder = PromptEncoder(folder)
    assert encoder.text_shape == (300, TEXT_DIM)
    embeds, mask = encoder.encode(["a blue car"])
    ref, ref_mask, _, _ = PixArtSigmaPipeline.from_pretrained(folder, local_files_only=True).encode_prompt(["a blue car"], device="cpu")
    torch.testing.assert_close(embeds, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(mask, ref_mask) and mask.shape == (1, 300)
    assert PromptEncoder(folder, max_length=12).encode(["a blue car"])[0].shape == (1, 12, TEXT_DIM)


def test_caption_cleaning_needs_its_packages(pipeline_dir):
    from diffusers.utils import is_bs4_available, is_ftfy_available

    if is_bs4_available() and is_ftfy_available():
        pytest.skip("bs4 and ftfy are installed here")
    with pytest.raises(ValueError, match="caption cleaning needs the bs4 and ftfy packages"):
        PromptEncoder(pipeline_dir, clean_caption=True)


def one_line_error(capsys, argv) -> str:
    from leandit import cli

    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    return err


def test_one_line_errors(pipeline_dir, image_root, caption_files, tmp_path, capsys, monkeypatch):
    from leandit import cli

    if "encode-prompts" not in cli.COMMANDS:
        monkeypatch.setattr(cli, "COMMANDS", cli.COMMANDS + ("encode-prompts",))

    def encode(folder):
        return one_line_error(capsys, ["encode-prompts", "--pipeline", str(folder), "--prompts", "a cat", "--out", str(tmp_path / "p.st")])

    assert "no pipeline folder at" in encode(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(pipeline_dir, broken, ignore=shutil.ignore_patterns("text_encoder"))
    err = encode(broken)
    assert "has no text_encoder/" in err and "download the whole pipeline" in err
    shutil.rmtree(broken / "tokenizer")
    assert "has no tokenizer/" in encode(broken)
    (broken / "model_index.json").unlink()
    err = encode(broken)
    assert "has no model_index.json" in err and "not a diffusers pipeline folder" in err
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    assert "holds a StableDiffusion3Pipeline" in encode(broken)
    from transformers.utils import is_protobuf_available, is_sentencepiece_available

    if not (is_sentencepiece_available() and is_protobuf_available()):  # a hub tokenizer/ with only spiece.model
        spiece = tmp_path / "spiece"
        shutil.copytree(pipeline_dir, spiece)
        (spiece / "tokenizer" / "tokenizer.json").unlink()
        (spiece / "tokenizer" / "spiece.model").write_bytes(b"a sentencepiece model")
        assert "pip install sentencepiece protobuf" in encode(spiece)
    assert "no prompt file at" in one_line_error(
        capsys, ["encode-prompts", "--pipeline", str(pipeline_dir), "--prompts", "missing.txt", "--out", str(tmp_path / "p.st")]
    )
    with pytest.raises(FileNotFoundError, match="no prompt embeddings at .*run 'leandit encode-prompts"):
        load_prompt_embeddings(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a prompt embedding file"):
        load_prompt_embeddings(tmp_path / "junk.safetensors")

    extract = ["extract-features", str(image_root), "--out", str(tmp_path / "o"), "--resolution", str(RES)]
    assert "need --pipeline" in one_line_error(capsys, extract + ["--captions", "txt"])
    assert "add --captions" in one_line_error(capsys, extract + ["--pipeline", str(pipeline_dir)])
    assert "pass --vae" in one_line_error(capsys, extract)
    no_vae = tmp_path / "no-vae"
    shutil.copytree(pipeline_dir, no_vae, ignore=shutil.ignore_patterns("vae"))
    assert "has no vae/" in one_line_error(capsys, extract + ["--pipeline", str(no_vae), "--captions", "txt"])
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({k: v for k, v in CAPTIONS.items() if k != "sub/c.webp"}))
    err = one_line_error(capsys, extract + ["--pipeline", str(pipeline_dir), "--captions", str(partial)])
    assert "1 of 5 images" in err and "have no caption (sub/c.webp)" in err
    assert "no caption file at" in one_line_error(capsys, extract + ["--pipeline", str(pipeline_dir), "--captions", "nope.json"])
    (tmp_path / "bad.jsonl").write_text('{"file_name": "a.png"}\n')
    assert 'line 1 has no "file_name" and "text"' in one_line_error(
        capsys, extract + ["--pipeline", str(pipeline_dir), "--captions", str(tmp_path / "bad.jsonl")]
    )
    bare = tmp_path / "bare"
    shutil.copytree(image_root, bare, ignore=shutil.ignore_patterns("*.txt"))
    (bare / "b.txt").write_text("the cat")
    err = one_line_error(capsys, ["extract-features", str(bare), "--out", str(tmp_path / "o3"), "--pipeline", str(pipeline_dir),
                                  "--captions", "txt"])
    assert "4 of 5 images" in err and "write IMAGE.txt beside each IMAGE" in err


def test_extract_features_cli_captioned(extracted, image_root, pipeline_dir, tmp_path, capsys):
    from leandit import cli

    out = tmp_path / "cli"
    assert cli.main(["extract-features", str(image_root), "--pipeline", str(pipeline_dir), "--captions", "txt", "--out", str(out),
                     "--resolution", str(RES), "--shard-size", "5", "--no-flip", "--device", "cpu", "--quiet"]) == 0
    assert "encoded 5 images into 1 shards" in capsys.readouterr().out
    ds = LatentShardDataset(out)
    assert len(ds) == 5 and ds.caption(3) == "a small blue house"  # .txt captions are stripped
    torch.testing.assert_close(ds[0][1]["text"], LatentShardDataset(extracted[0])[0][1]["text"])
    with pytest.raises(SystemExit):
        cli.main(["extract-features", "--help"])
    shown = capsys.readouterr().out
    for option in ("--pipeline", "--captions", "--max-length", "--text-encoder-dtype", "--clean-caption", "--vae"):
        assert option in shown
