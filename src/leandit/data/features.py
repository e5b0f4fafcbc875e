"""Encode an image folder into latent shards with a diffusers AutoencoderKL: an
ImageNet-layout folder with class labels, or captioned images with the prompt embeddings of
a local PixArt pipeline folder (`leandit.data.text`).

Preprocessing follows ADM/DiT (center crop, [-1, 1]); variant 1 of each image is the latent
of its horizontal flip, the augmentation DiT applies before the VAE. The VAE's posterior
sample uses noise seeded by (seed, image index, variant), so the shards are the same for any
batch size and any number of processes. Shard k holds images [k*S, (k+1)*S) and belongs to
process k % world_size; a complete shard is never redone, so rerunning the same command
finishes an interrupted extraction.
"""

from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..diffusion.noise import mix_seed
from . import latents as fmt
from .text import CAPTION_KEYWORDS, PromptEncoder, captioned_images, captions_fingerprint, check_text_options, read_pipeline, text_fingerprints
from .vae import LATENT_SCALE, load_vae, read_vae_config, vae_fingerprint

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def list_images(image_root: str | os.PathLike) -> tuple[list[Path], list[int], list[str]]:
    """(paths, labels, class_names) of an ImageNet-layout folder, in the global order.

    The label is the index of the sorted class sub-folder names; each class's images are
    found recursively and sorted, so the order (and thus every image's index and seed) is a
    pure function of the folder's content. Hidden files and folders are skipped: macOS
    leaves "._name.jpg" resource forks that are not images.
    """
    root = Path(image_root)
    layout = "pass a folder with one sub-folder of images per class (ImageNet layout: ROOT/CLASS/IMAGE.jpg)"
    if not root.is_dir():
        raise FileNotFoundError(f"no image folder at {root}: {layout}")
    class_names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not class_names:
        raise ValueError(f"no class sub-folders in {root}: {layout}")
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            found += [
                os.path.relpath(os.path.join(dirpath, f), root)
                for f in filenames
                if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
            ]
        found.sort()
        paths += [root / rel for rel in found]
        labels += [label] * len(found)
    if not paths:
        raise ValueError(f"no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) in the class folders of {root}: {layout}")
    return paths, labels, class_names


def files_fingerprint(root: Path, paths: Sequence[Path]) -> str:
    """A hash of the relative file list: a resume into a folder made from other images is refused."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.relative_to(root).as_posix().encode())
        h.update(b"\n")
    return h.hexdigest()


def center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """The ADM center crop: halve with BOX while the short side is >= 2x the target (cheap,
    alias-free), resize with BICUBIC so the short side equals `resolution`, crop the center."""
    while min(image.size) >= 2 * resolution:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """An image file -> center-cropped RGB uint8 tensor (3, resolution, resolution)."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {path}: {err}; remove or replace it and rerun (complete shards are kept)") from None
    array = np.asarray(center_crop(image, resolution))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def uint8_to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [-1, 1], as ToTensor + Normalize(0.5, 0.5)."""
    return (images.float() / 255.0 - 0.5) / 0.5


@torch.no_grad()
def encode_latents(
    vae, images: torch.Tensor, indices: Sequence[int], *, seed: int, flip: bool, scale: float = LATENT_SCALE
) -> torch.Tensor:
    """Scaled posterior samples (B, V, C, h, w), float32 on the CPU, for images in [-1, 1].

    The noise of image i, variant v comes from its own CPU generator seeded by
    mix_seed(seed, i, v): the sample is the same on any device, batch size or process count.
    """
    device = next(vae.parameters()).device
    views = [images, images.flip(-1)] if flip else [images]
    out = []
    for variant, view in enumerate(views):
        dist = vae.encode(view.to(device)).latent_dist
        shape = tuple(dist.mean.shape[1:])
        noise = torch.stack(
            [torch.randn(shape, generator=torch.Generator().manual_seed(mix_seed(seed, i, variant))) for i in indices]
        )
        sample = dist.mean + dist.std * noise.to(device=device, dtype=dist.mean.dtype)
        out.append((sample * scale).float().cpu())
    return torch.stack(out, dim=1)


def _resolve_device(device: str | torch.device) -> torch.device:
    from ..train.distributed import resolve_device

    try:
        return resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    except RuntimeError as err:
        raise ValueError(str(err)) from None


def _resolve_ranks(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Defaults from torchrun's RANK / WORLD_SIZE; one process when they are unset."""
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else int(world_size)
    rank = int(os.environ.get("RANK", "0")) if rank is None else int(rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of {world_size} processes is not valid: need 0 <= rank < world_size")
    return rank, world_size


def _check_options(resolution: int, shard_size: int, batch_size: int, dtype: str) -> None:
    for name, value in (("resolution", resolution), ("shard size", shard_size), ("batch size", batch_size)):
        if int(value) < 1:
            raise ValueError(f"the {name} must be at least 1, got {value}")
    if dtype not in fmt.DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(fmt.DTYPES)}, got {dtype!r}")


def _check_resume(out: Path, meta: dict[str, Any]) -> None:
    """Refuse to add shards to a folder extracted with other settings or other images."""
    if not (out / fmt.INDEX_FILE).exists():
        return
    old = fmt.read_index(out)
    if fmt.settings_id(old) != fmt.settings_id(meta):
        fields = dict.fromkeys(fmt.settings_fields(old) + fmt.settings_fields(meta))
        differ = [k for k in fields if old.get(k) != meta.get(k)]
        raise ValueError(
            f"{out} holds latents extracted with other settings ({', '.join(differ)} differ); "
            "pass a new --out folder, or rerun with the options of the first run to complete it"
        )


def _batches(
    jobs: list[tuple[int, int, int]], paths: Sequence[Path], resolution: int, pool: ThreadPoolExecutor
) -> Iterator[tuple[int, int, int, torch.Tensor]]:
    """(shard, start, end, uint8 images) per job, decoding the next batch in threads while
    the caller encodes this one: image decoding would otherwise idle the GPU."""

    def submit(job):
        return [pool.submit(load_image, paths[i], resolution) for i in range(job[1], job[2])]

    pending = submit(jobs[0]) if jobs else None
    for n, job in enumerate(jobs):
        current = pending
        pending = submit(jobs[n + 1]) if n + 1 < len(jobs) else None
        yield (*job, torch.stack([f.result() for f in current]))


def _pipeline_vae(pipeline: str | os.PathLike) -> Path:
    """The vae/ of a pipeline folder, for captioned extraction without --vae."""
    path = Path(pipeline) / "vae"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{pipeline} has no vae/ (config.json + weights): pass --vae VAE_FOLDER, or the whole pipeline folder")
    return path


def _metadata(
    root: Path,
    paths: Sequence[Path],
    class_names: list[str] | None,
    vae_path: str | os.PathLike,
    vae_config: dict[str, Any],
    *,
    resolution: int,
    shard_size: int,
    flip: bool,
    dtype: str,
    seed: int,
    text: dict[str, Any] | None,
) -> dict[str, Any]:
    """index.json of an extraction: class labels (text None; the fields and their order are
    those of every class-label folder written so far) or captions (`text` adds its fields)."""
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    meta: dict[str, Any] = {
        "format": fmt.FORMAT,
        "version": fmt.VERSION,
        "latent_shape": [int(vae_config["latent_channels"]), resolution // factor, resolution // factor],
        "variants": 2 if flip else 1,
        "flip": bool(flip),
        "dtype": dtype,
        "shard_size": int(shard_size),
        "num_images": len(paths),
        "num_shards": fmt.num_shards(len(paths), shard_size),
    }
    if class_names is not None:
        meta.update(num_classes=len(class_names), class_names=class_names)
    meta.update(
        # The VAE's own factor: 0.18215 for the SD VAEs of DiT/SiT/PixArt-alpha, 0.13025 for
        # PixArt-Sigma's SDXL VAE, 0.2325 for MAR's KL-16; the SD factor when a config has none.
        scale_factor=float(vae_config.get("scaling_factor") or LATENT_SCALE),
        resolution=int(resolution),
        seed=int(seed),
        vae=str(Path(vae_path).resolve()),
        vae_sha256=vae_fingerprint(vae_path),
        image_root=str(root.resolve()),
        files_sha256=files_fingerprint(root, paths),
    )
    if text is not None:
        meta.update(conditioning="text", **text, null_text=fmt.NULL_TEXT_FILE)
    return meta


def _text_metadata(pipeline, info, captions, texts, *, max_length, text_encoder_dtype, clean_caption) -> dict[str, Any]:
    """The caption and text-encoder fields of a captioned index.json (no weights loaded);
    `info` is `read_pipeline(pipeline)`."""
    length = int(max_length or info["max_length"])
    check_text_options(length, text_encoder_dtype, clean_caption)
    source = str(captions) if str(captions) in CAPTION_KEYWORDS else str(Path(captions).resolve())
    return {
        "captions": source,
        "captions_sha256": captions_fingerprint(texts),
        "pipeline": info["folder"],
        "pipeline_class": info["class_name"],
        "max_length": length,
        "text_shape": [length, info["text_dim"]],
        "text_encoder_dtype": text_encoder_dtype,
        "clean_caption": bool(clean_caption),
        **text_fingerprints(pipeline),
    }


def _plan(root: Path, vae_path, pipeline, captions, text_options: dict[str, Any], **options) -> tuple:
    """(paths, labels, captions, vae_path, meta) of an extraction: labels for class-label
    folders, captions (and the pipeline's vae/ when no VAE is given) for captioned ones; the
    other of the two is None. Reads configs and fingerprints, no weights."""
    if captions is None:
        if pipeline is not None:
            raise ValueError("--pipeline is for captioned images: add --captions FILE, txt or class-names (or drop --pipeline for class labels)")
        if vae_path is None:
            raise ValueError("pass --vae VAE_FOLDER (class labels), or --pipeline PIPELINE_FOLDER --captions ... (captions)")
        vae_config = read_vae_config(vae_path)
        paths, labels, class_names = list_images(root)
        texts = None
    else:
        if pipeline is None:
            raise ValueError("captioned images need --pipeline PIPELINE_FOLDER: the local diffusers pipeline whose text encoder embeds the captions")
        info = read_pipeline(pipeline)
        vae_path = _pipeline_vae(pipeline) if vae_path is None else vae_path
        vae_config = read_vae_config(vae_path)
        paths, texts, class_names = captioned_images(root, captions)
        labels = None
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    if options["resolution"] % factor:
        raise ValueError(f"the resolution {options['resolution']} is not a multiple of the VAE's downsampling factor {factor}")
    text_meta = None if texts is None else _text_metadata(pipeline, info, captions, texts, **text_options)
    meta = _metadata(root, paths, class_names, vae_path, vae_config, text=text_meta, **options)
    return paths, labels, texts, vae_path, meta


def _encode_shards(jobs, paths, labels, texts, meta, out: Path, vae, text_encoder, bar) -> int:
    """Encode the (shard, start, end) batches of `jobs` and write each shard after its last
    batch; `text_encoder()` gives the PromptEncoder of captioned folders. Returns the images done."""
    size, num_images, store = meta["shard_size"], meta["num_images"], fmt.DTYPES[meta["dtype"]]
    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    chunks: list[torch.Tensor] = []
    text_chunks: list[tuple[torch.Tensor, torch.Tensor]] = []
    done = 0
    try:
        for k, b, e, images in _batches(jobs, paths, meta["resolution"], pool):
            chunks.append(encode_latents(vae, uint8_to_model_range(images), range(b, e), seed=meta["seed"], flip=meta["flip"],
                                         scale=meta["scale_factor"]))  # (B, V, C, h, w)
            if texts is not None:
                embeds, mask = text_encoder().encode(texts[b:e])  # (B, L, D), (B, L)
                text_chunks.append((embeds.to(store), mask))  # stored precision now: a shard of T5-XXL is ~1 GB
            bar.update(e - b)
            done += e - b
            if e == min((k + 1) * size, num_images):  # the shard's last batch
                rows = torch.arange(k * size, e)
                if texts is None:
                    fmt.write_shard(out, k, torch.cat(chunks), torch.tensor(labels[k * size : e]), rows, meta)
                else:
                    fmt.write_text_shard(out, k, torch.cat(chunks), torch.cat([t for t, _ in text_chunks]),
                                         torch.cat([m for _, m in text_chunks]), rows, texts[k * size : e], meta)
                chunks, text_chunks = [], []
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return done


def extract_features(
    image_root: str | os.PathLike,
    vae_path: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    *,
    pipeline: str | os.PathLike | None = None,
    captions: str | os.PathLike | None = None,
    max_length: int | None = None,
    text_encoder_dtype: str = "float32",
    clean_caption: bool = False,
    resolution: int = 256,
    shard_size: int = 1024,
    batch_size: int = 32,
    flip: bool = True,
    dtype: str = "float16",
    seed: int = 0,
    device: str | torch.device = "auto",
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Encode `image_root` into latent shards in `out_dir` (this process's share of them).

    Class labels (captions None): `image_root` is in ImageNet layout and `vae_path` the VAE.
    Captions (a caption file, "txt" or "class-names": see `leandit.data.text`): `pipeline` is
    a local PixArt pipeline folder whose tokenizer and text encoder embed each caption as
    the pipeline does (`max_length` tokens: default the pipeline's; the text encoder runs in
    `text_encoder_dtype`) and whose vae/ encodes the images unless `vae_path` is given; the
    folder may be flat or nested (ImageNet layout for "class-names").

    Returns a summary: images encoded by this call, shards written and skipped (already
    complete), the total shard count, whether all shards now exist, and the seconds taken.
    Run it with the same arguments on every process (torchrun sets RANK / WORLD_SIZE); no
    process group is needed because the processes write disjoint files.
    """
    start_time = time.perf_counter()
    _check_options(resolution, shard_size, batch_size, dtype)
    rank, world_size = _resolve_ranks(rank, world_size)
    device = _resolve_device(device)
    text_options = dict(max_length=max_length, text_encoder_dtype=text_encoder_dtype, clean_caption=clean_caption)
    paths, labels, texts, vae_path, meta = _plan(Path(image_root), vae_path, pipeline, captions, text_options, resolution=resolution,
                                                 shard_size=shard_size, flip=flip, dtype=dtype, seed=seed)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: pass a folder for the latent shards")
    out.mkdir(parents=True, exist_ok=True)
    _check_resume(out, meta)

    encoder = None  # the text encoder, loaded only when there is text to encode

    def text_encoder() -> PromptEncoder:
        nonlocal encoder
        if encoder is None:
            encoder = PromptEncoder(pipeline, device=device, max_length=meta["max_length"], dtype=text_encoder_dtype,
                                    clean_caption=clean_caption)
        return encoder

    if rank == 0:
        # The null text first: a folder with index.json always has it (unless deleted).
        if texts is not None and fmt.null_text_problem(out / fmt.NULL_TEXT_FILE, meta) is not None:
            fmt.write_null_text(out, *text_encoder().null(), meta)
        if not (out / fmt.INDEX_FILE).exists():
            fmt.write_index(out, meta)

    total = meta["num_shards"]
    mine = range(rank, total, world_size)
    todo = [k for k in mine if fmt.shard_problem(out / fmt.shard_name(k), k, meta) is not None]
    jobs = [
        (k, b, min(b + batch_size, (k + 1) * shard_size, len(paths)))
        for k in todo
        for b in range(k * shard_size, min((k + 1) * shard_size, len(paths)), batch_size)
    ]
    images_done = 0
    if jobs:
        desc = "extract-features" + (f" [rank {rank}/{world_size}]" if world_size > 1 else "")
        bar = tqdm(total=sum(e - b for _, b, e in jobs), unit="img", desc=desc, disable=not progress, dynamic_ncols=True)
        try:
            images_done = _encode_shards(jobs, paths, labels, texts, meta, out, load_vae(vae_path, device), text_encoder, bar)
        finally:
            bar.close()

    complete = all((out / fmt.shard_name(k)).exists() for k in range(total))
    return {
        "conditioning": fmt.conditioning(meta),
        "images": images_done,
        "shards_written": len(todo),
        "shards_skipped": len(mine) - len(todo),
        "num_shards": total,
        "total_images": len(paths),
        "complete": complete,
        "rank": rank,
        "world_size": world_size,
        "out": str(out),
        "seconds": time.perf_counter() - start_time,
    }
