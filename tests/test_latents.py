"""The latent shard format and LatentShardDataset, on synthetic shards (no VAE needed)."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from leandit.data import open_training_data
from leandit.data import latents as fmt
from leandit.data.latents import LatentShardDataset

SHAPE = (4, 2, 2)


def make_meta(num_images: int = 10, shard_size: int = 4, variants: int = 2, dtype: str = "float16") -> dict:
    return {
        "format": fmt.FORMAT,
        "version": fmt.VERSION,
        "latent_shape": list(SHAPE),
        "variants": variants,
        "flip": variants == 2,
        "dtype": dtype,
        "shard_size": shard_size,
        "num_images": num_images,
        "num_shards": fmt.num_shards(num_images, shard_size),
        "num_classes": 3,
        "class_names": ["a", "b", "c"],
        "scale_factor": 0.18215,
        "resolution": 16,
        "seed": 0,
        "vae": "/nowhere/vae",
        "files_sha256": "0" * 64,
    }


def latent_of(image: int, variant: int) -> torch.Tensor:
    """A recognisable latent: every value encodes (image, variant) exactly in float16."""
    return torch.full(SHAPE, image + variant / 4) + torch.arange(4.0).view(4, 1, 1) / 64


def write_folder(folder, meta: dict, skip: tuple[int, ...] = ()) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    fmt.write_index(folder, meta)
    n, size = meta["num_images"], meta["shard_size"]
    for k in range(fmt.num_shards(n, size)):
        if k in skip:
            continue
        rows = torch.arange(k * size, min((k + 1) * size, n))
        lat = torch.stack([torch.stack([latent_of(int(i), v) for v in range(meta["variants"])]) for i in rows])
        fmt.write_shard(folder, k, lat, rows % 3, rows, meta)


def test_shard_files_hold_the_documented_tensors(tmp_path):
    meta = make_meta()
    write_folder(tmp_path, meta)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["index.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    assert json.loads((tmp_path / "index.json").read_text()) == meta
    from safetensors.torch import load_file

    last = load_file(tmp_path / "shard-00002.safetensors")
    assert last["latents"].shape == (2, 2, *SHAPE) and last["latents"].dtype == torch.float16
    assert last["labels"].dtype == torch.int64 and last["labels"].tolist() == [8 % 3, 9 % 3]
    assert last["indices"].dtype == torch.int64 and last["indices"].tolist() == [8, 9]
    # written with the umask mode, not safetensors' private 0600
    mode = os.stat(tmp_path / "shard-00000.safetensors").st_mode & 0o777
    assert mode == 0o666 & ~fmt._umask()


def test_reader_items_are_image_variant_pairs(tmp_path):
    write_folder(tmp_path, make_meta())
    ds = LatentShardDataset(tmp_path)
    assert len(ds) == 20
    assert ds.latent_shape == SHAPE and ds.num_classes == 3 and ds.class_names == ["a", "b", "c"]
    assert ds.scale_factor == pytest.approx(0.18215)
    for k in (0, 1, 7, 8, 9, 19):
        x, y = ds[k]
        assert x.dtype == torch.float32 and x.shape == SHAPE
        assert y.dtype == torch.int64 and y.shape == ()
        torch.testing.assert_close(x, latent_of(k // 2, k % 2))
        assert int(y) == (k // 2) % 3
    torch.testing.assert_close(ds[-1][0], ds[19][0])
    with pytest.raises(IndexError):
        ds[20]


def test_reader_without_flips_and_float32(tmp_path):
    write_folder(tmp_path, make_meta(num_images=5, shard_size=5, variants=1, dtype="float32"))
    ds = LatentShardDataset(tmp_path)
    assert len(ds) == 5
    torch.testing.assert_close(ds[3][0], latent_of(3, 0))


def test_reader_in_dataloader_workers(tmp_path):
    write_folder(tmp_path, make_meta())
    ds = LatentShardDataset(tmp_path)
    ds[0]  # an open handle in the parent must not leak into forked workers
    order = [13, 0, 5, 19, 8, 2, 11, 4]
    loader = DataLoader(ds, batch_size=4, sampler=order, num_workers=2)
    xs, ys = zip(*loader)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (8, *SHAPE) and x.dtype == torch.float32 and y.dtype == torch.int64
    torch.testing.assert_close(x, torch.stack([latent_of(k // 2, k % 2) for k in order]))
    assert y.tolist() == [(k // 2) % 3 for k in order]
    clone = pickle.loads(pickle.dumps(ds))  # spawn-style workers pickle the data set
    torch.testing.assert_close(clone[13][0], ds[13][0])


def test_open_training_data_reads_a_shard_folder(tmp_path):
    write_folder(tmp_path, make_meta())
    ds = open_training_data(str(tmp_path))
    assert isinstance(ds, LatentShardDataset) and len(ds) == 20


def test_error_for_a_folder_without_shards(tmp_path):
    with pytest.raises(FileNotFoundError, match="no latent shards in .*extract-features"):
        LatentShardDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="no latent folder"):
        LatentShardDataset(tmp_path / "missing")


def test_error_for_shards_without_index(tmp_path):
    write_folder(tmp_path, make_meta())
    (tmp_path / "index.json").unlink()
    with pytest.raises(FileNotFoundError, match="no index.json.*rerun 'leandit extract-features'"):
        LatentShardDataset(tmp_path)


def test_error_for_a_gap_in_the_shards(tmp_path):
    write_folder(tmp_path, make_meta(), skip=(1,))
    with pytest.raises(FileNotFoundError, match=r"incomplete: 1 of 3 shards are missing \(1\).*not finished.*rerun"):
        LatentShardDataset(tmp_path)


def test_error_for_a_shard_whose_shape_disagrees(tmp_path):
    meta = make_meta()
    write_folder(tmp_path, meta)
    header = {fmt.HEADER_KEY: json.dumps({"settings_id": fmt.settings_id(meta)})}
    bad = {"latents": torch.zeros(4, 2, 4, 3, 3), "labels": torch.zeros(4, dtype=torch.int64), "indices": torch.arange(4, 8)}
    save_file(bad, tmp_path / "shard-00001.safetensors", metadata=header)
    with pytest.raises(ValueError, match=r"shard-00001.safetensors holds latents of shape \(4, 2, 4, 3, 3\).*\(4, 2, 4, 2, 2\)"):
        LatentShardDataset(tmp_path)


def test_error_for_a_shard_from_other_settings(tmp_path):
    write_folder(tmp_path, make_meta())
    other = make_meta()
    other["seed"] = 1
    write_folder(tmp_path / "other", other)
    os.replace(tmp_path / "other" / "shard-00002.safetensors", tmp_path / "shard-00002.safetensors")
    with pytest.raises(ValueError, match="shard-00002.safetensors was written with other settings"):
        LatentShardDataset(tmp_path)


def test_error_for_a_foreign_index(tmp_path):
    (tmp_path / "index.json").write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="not a leandit latent index"):
        LatentShardDataset(tmp_path)


def test_interrupted_write_leaves_no_file(tmp_path):
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a shard")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fmt.atomic_write(tmp_path / "shard-00000.safetensors", write)
    assert list(tmp_path.iterdir()) == []


def test_write_shard_rejects_wrong_shapes(tmp_path):
    meta = make_meta()
    with pytest.raises(ValueError, match="do not match"):
        fmt.write_shard(tmp_path, 0, torch.zeros(4, 1, *SHAPE), torch.zeros(4), torch.arange(4), meta)
