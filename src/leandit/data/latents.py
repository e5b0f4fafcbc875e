"""Sharded VAE latents on disk: the writer's file format and `LatentShardDataset`.

A folder written by `leandit extract-features` holds

    index.json                 metadata of the whole extraction (written once, by rank 0)
    shard-00000.safetensors    images [0, S) of the sorted file list
    shard-00001.safetensors    images [S, 2S) ...
    null-text.safetensors      captioned folders only: the empty prompt's embedding

Each shard holds `latents` (n, V, C, h, w) - V = 2 when variant 1 is the latent of the
horizontally flipped image, V = 1 without flips - and `indices` (n,) int64, the global index of
each image, and then the condition of each image:
- class labels (index.json without "conditioning", or "class"): `labels` (n,) int64;
- captions ("conditioning": "text"): `text` (n, L, D) - the text encoder's output at each of
  the L tokens, in the latents' dtype - and `text_mask` (n, L) int64, 1 on real tokens; the
  caption strings are in the shard's header (see `shard_captions`). Both variants of an image
  share its caption. null-text.safetensors holds `text` (L, D) and `text_mask` (L,) of "".
Many latents per file keep ImageNet at ~1250 files instead of 1.28 M. Every file is written
under a temporary name and renamed into place, so a shard that exists is complete; an
interrupted extraction shows as missing shards, never as a truncated one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

FORMAT = "leandit-latent-shards"
VERSION = 1
INDEX_FILE = "index.json"
HEADER_KEY = "leandit"  # the shard's own metadata (JSON) in the safetensors header
SHARD_PATTERN = "shard-{:05d}.safetensors"
DTYPES = {"float16": torch.float16, "float32": torch.float32}

# The fields that decide what a shard contains: a resume may only add shards to a folder
# whose index agrees on all of them, and each shard carries their hash to prove it.
SETTINGS_FIELDS = (
    "format",
    "version",
    "latent_shape",
    "variants",
    "flip",
    "dtype",
    "shard_size",
    "num_images",
    "files_sha256",
    "class_names",
    "resolution",
    "scale_factor",
    "seed",
    "vae_sha256",
)

# Captioned folders: these too decide the content (the captions, the text encoder and how
# prompts are tokenized); the source of the captions (a file, .txt files) does not.
TEXT_SETTINGS_FIELDS = SETTINGS_FIELDS + (
    "conditioning",
    "captions_sha256",
    "pipeline_class",
    "max_length",
    "text_shape",
    "text_encoder_sha256",
    "tokenizer_sha256",
    "text_encoder_dtype",
    "clean_caption",
)
NULL_TEXT_FILE = "null-text.safetensors"

_RERUN = "rerun 'leandit extract-features' with the same options to complete it"


def shard_name(k: int) -> str:
    return SHARD_PATTERN.format(k)


def num_shards(num_images: int, shard_size: int) -> int:
    return math.ceil(num_images / shard_size)


def shard_rows(k: int, num_images: int, shard_size: int) -> int:
    """How many images shard k holds (the last shard may be short)."""
    return min(shard_size, num_images - k * shard_size)


def conditioning(meta: dict[str, Any]) -> str:
    """"class" or "text": what a folder's shards hold besides latents."""
    return meta.get("conditioning", "class")


def settings_fields(meta: dict[str, Any]) -> tuple[str, ...]:
    return TEXT_SETTINGS_FIELDS if conditioning(meta) == "text" else SETTINGS_FIELDS


def settings_id(meta: dict[str, Any]) -> str:
    """A short hash of the fields that decide a shard's content."""
    blob = json.dumps({k: meta.get(k) for k in settings_fields(meta)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def atomic_write(path: Path, write) -> None:
    """Call `write(tmp_path)`, flush it to disk, then rename it to `path`.

    The temporary file lives in the same folder (so the rename is atomic) and starts with a
    dot, so readers that glob for shards never see it.
    """
    tmp = str(path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        # safetensors creates files as 0600; give them the usual umask mode so a team can read them.
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_index(folder: Path, meta: dict[str, Any]) -> None:
    """Write `index.json` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")

    atomic_write(folder / INDEX_FILE, write)


def read_index(folder: Path) -> dict[str, Any]:
    """The metadata of a shard folder, with a one-line error when there is none."""
    folder = Path(folder)
    path = folder / INDEX_FILE
    if not path.exists():
        if not folder.is_dir():
            raise FileNotFoundError(f"no latent folder at {folder}: run 'leandit extract-features IMAGES --vae VAE --out {folder}' first")
        if any(folder.glob("shard-*.safetensors")):
            raise FileNotFoundError(f"{folder} has latent shards but no {INDEX_FILE}: the extraction did not finish; {_RERUN}")
        raise FileNotFoundError(
            f"no latent shards in {folder} (no {INDEX_FILE}): run 'leandit extract-features IMAGES --vae VAE --out {folder}' first"
        )
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path}: {err}; delete the folder and rerun 'leandit extract-features'") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a leandit latent index (format {FORMAT!r}); pass a folder written by 'leandit extract-features'")
    if meta.get("version") != VERSION:
        raise ValueError(
            f"{path} has format version {meta.get('version')}, this leandit reads version {VERSION}; "
            "rerun 'leandit extract-features' into a new folder"
        )
    return meta


def write_shard(
    folder: Path, k: int, latents: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, meta: dict[str, Any]
) -> Path:
    """Write shard k atomically; `latents` (n, V, C, h, w) is stored in `meta["dtype"]`."""
    n = latents.shape[0]
    expected = (n, meta["variants"], *meta["latent_shape"])
    if tuple(latents.shape) != expected or labels.shape != (n,) or indices.shape != (n,):
        raise ValueError(f"shard {k}: latents {tuple(latents.shape)} do not match the expected {expected}")
    tensors = {
        "latents": latents.to(DTYPES[meta["dtype"]]).contiguous().cpu(),
        "labels": labels.to(torch.int64).contiguous().cpu(),
        "indices": indices.to(torch.int64).contiguous().cpu(),
    }
    return _save(Path(folder) / shard_name(k), tensors, {"shard": k}, meta)


def write_text_shard(
    folder: Path,
    k: int,
    latents: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor,
    indices: torch.Tensor,
    captions: list[str],
    meta: dict[str, Any],
) -> Path:
    """Write shard k of a captioned folder atomically: latents (n, V, C, h, w) and text
    (n, L, D) in `meta["dtype"]`, text_mask (n, L) int64, the captions in the header."""
    n = latents.shape[0]
    want = shard_shapes(meta, n)
    got = {"latents": list(latents.shape), "text": list(text.shape), "text_mask": list(text_mask.shape), "indices": list(indices.shape)}
    if got != want or len(captions) != n:
        raise ValueError(f"shard {k}: tensors {got} and {len(captions)} captions do not match the expected {want}")
    store = DTYPES[meta["dtype"]]
    tensors = {
        "latents": latents.to(store).contiguous().cpu(),
        "text": text.to(store).contiguous().cpu(),
        "text_mask": text_mask.to(torch.int64).contiguous().cpu(),
        "indices": indices.to(torch.int64).contiguous().cpu(),
    }
    return _save(Path(folder) / shard_name(k), tensors, {"shard": k, "captions": list(captions)}, meta)


def write_null_text(folder: Path, text: torch.Tensor, text_mask: torch.Tensor, meta: dict[str, Any]) -> Path:
    """Write null-text.safetensors: the empty prompt's `text` (L, D) and `text_mask` (L,)."""
    L, D = meta["text_shape"]
    if tuple(text.shape) != (L, D) or tuple(text_mask.shape) != (L,):
        raise ValueError(f"the null text {tuple(text.shape)}, {tuple(text_mask.shape)} does not match {(L, D)}, {(L,)}")
    tensors = {"text": text.to(DTYPES[meta["dtype"]]).contiguous().cpu(), "text_mask": text_mask.to(torch.int64).contiguous().cpu()}
    return _save(Path(folder) / NULL_TEXT_FILE, tensors, {"null_text": True}, meta)


def _save(path: Path, tensors: dict[str, torch.Tensor], extra: dict[str, Any], meta: dict[str, Any]) -> Path:
    # One metadata key: safetensors writes its metadata map in arbitrary order, and a single
    # entry keeps shard files byte-identical however and wherever they were computed.
    fields = {"format": FORMAT, "version": VERSION, "settings_id": settings_id(meta), **extra}
    header = {HEADER_KEY: json.dumps(fields, sort_keys=True, ensure_ascii=False)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))
    return path


def shard_shapes(meta: dict[str, Any], n: int) -> dict[str, list[int]]:
    """The tensors (name -> shape) of a shard of n images of the extraction `meta`."""
    shapes = {"latents": [n, meta["variants"], *meta["latent_shape"]]}
    if conditioning(meta) == "text":
        L, D = meta["text_shape"]
        shapes.update(text=[n, L, D], text_mask=[n, L])
    else:
        shapes["labels"] = [n]
    shapes["indices"] = [n]
    return shapes


def shard_captions(path: Path) -> list[str]:
    """The captions of a captioned shard, in row order, from its header."""
    with safe_open(str(path), framework="pt") as f:
        return list(json.loads((f.metadata() or {}).get(HEADER_KEY, "{}")).get("captions", []))


def shard_problem(path: Path, k: int, meta: dict[str, Any]) -> str | None:
    """Why shard file `path` is not shard k of the extraction `meta` (None when it is).

    Reads only the file's header, so checking every shard of ImageNet takes a second.
    """
    n = shard_rows(k, meta["num_images"], meta["shard_size"])
    return _file_problem(path, shard_shapes(meta, n), meta, captions=n if conditioning(meta) == "text" else None)


def null_text_problem(path: Path, meta: dict[str, Any]) -> str | None:
    """Why `path` is not the null-text file of the captioned extraction `meta` (None when it is)."""
    L, D = meta["text_shape"]
    return _file_problem(path, {"text": [L, D], "text_mask": [L]}, meta)


def _file_problem(path: Path, want: dict[str, list[int]], meta: dict[str, Any], captions: int | None = None) -> str | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {}).get(HEADER_KEY, "{}"))
            if header.get("settings_id") != settings_id(meta):
                return "was written with other settings than index.json"
            if set(f.keys()) != set(want):
                return f"holds tensors {sorted(f.keys())}, expected {sorted(want)}"
            for name, shape in want.items():
                got = list(f.get_slice(name).get_shape())
                if got != shape:
                    return f"holds {name} of shape {tuple(got)}, index.json implies {tuple(shape)}"
            if captions is not None and len(header.get("captions", [])) != captions:
                return f"holds {len(header.get('captions', []))} captions for {captions} images"
    except Exception as err:  # safetensors raises its own error types for damaged files
        return f"cannot be read ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    return None


class LatentShardDataset(Dataset):
    """(latent (C, h, w) float32, condition) items from a folder of latent shards.

    The condition follows index.json: `conditioning == "class"` gives the label (int64
    scalar); `conditioning == "text"` gives {"text": (L, D) float32, "text_mask": (L,) int64}
    and the data set's `null_condition` is the same dict for the empty prompt, the
    unconditional input of label dropout and guidance (class folders: None; the null class
    is `num_classes`, the model's business). Captioned folders have `num_classes` None (and
    `class_names` only when the captions are the class names); `caption(index)` reads an
    item's caption.

    Item k is variant k % V of image k // V: the flip of an image is a separate item, so
    which latent an index names never depends on randomness, and the training loop can
    resume exactly from a step number. Shards are opened lazily with `safe_open`
    (memory-mapped; only the rows asked for are read) and kept in a small per-process
    cache, so the data set works in DataLoader workers and does not hold the data in RAM.
    """

    max_open_shards = 64  # bounds open memory maps per worker; ImageNet has ~1250 shards

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        meta = read_index(self.folder)
        self.meta = meta
        self.latent_shape: tuple[int, int, int] = tuple(meta["latent_shape"])
        self.conditioning: str = conditioning(meta)
        text = self.conditioning == "text"
        self.num_classes: int | None = None if text else int(meta["num_classes"])
        self.class_names: list[str] | None = list(meta["class_names"]) if meta.get("class_names") is not None else None
        self.text_shape: tuple[int, int] | None = tuple(meta["text_shape"]) if text else None
        self.scale_factor: float = float(meta["scale_factor"])
        self.variants: int = int(meta["variants"])
        self.num_images: int = int(meta["num_images"])
        self.shard_size: int = int(meta["shard_size"])
        self.num_shards = num_shards(self.num_images, self.shard_size)
        self._check_shards()
        self.null_condition: dict[str, torch.Tensor] | None = self._read_null_text() if text else None
        self._handles: OrderedDict[int, Any] = OrderedDict()
        self._pid = os.getpid()

    def _read_null_text(self) -> dict[str, torch.Tensor]:
        path = self.folder / NULL_TEXT_FILE
        if not path.exists():
            raise FileNotFoundError(f"{self.folder} has no {NULL_TEXT_FILE} (the empty prompt's embedding, written by rank 0); {_RERUN}")
        problem = null_text_problem(path, self.meta)
        if problem:
            raise ValueError(f"{path} {problem}; delete it and {_RERUN}")
        with safe_open(str(path), framework="pt") as f:
            return {"text": f.get_tensor("text").to(torch.float32), "text_mask": f.get_tensor("text_mask").to(torch.int64)}

    def _check_shards(self) -> None:
        missing = [k for k in range(self.num_shards) if not (self.folder / shard_name(k)).exists()]
        if missing:
            shown = ", ".join(str(k) for k in missing[:8]) + (", ..." if len(missing) > 8 else "")
            raise FileNotFoundError(
                f"{self.folder} is incomplete: {len(missing)} of {self.num_shards} shards are missing ({shown}), "
                f"as from an extraction that has not finished; {_RERUN}"
            )
        for k in range(self.num_shards):
            path = self.folder / shard_name(k)
            problem = shard_problem(path, k, self.meta)
            if problem:
                raise ValueError(f"shard {path} {problem}; delete it and {_RERUN}")

    def __len__(self) -> int:
        return self.num_images * self.variants

    def _shard(self, k: int):
        # A handle opened before a fork must not be shared with the child: start afresh.
        if self._pid != os.getpid():
            self._handles, self._pid = OrderedDict(), os.getpid()
        handle = self._handles.get(k)
        if handle is None:
            handle = safe_open(str(self.folder / shard_name(k)), framework="pt")
            self._handles[k] = handle
            if len(self._handles) > self.max_open_shards:
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(k)
        return handle

    def _locate(self, index: int) -> tuple[int, int, int]:
        """(shard, row, variant) of item `index`."""
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        image, variant = divmod(index, self.variants)
        k, row = divmod(image, self.shard_size)
        return k, row, variant

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor | dict[str, torch.Tensor]]:
        k, row, variant = self._locate(index)
        f = self._shard(k)
        latent = f.get_slice("latents")[row, variant].to(torch.float32)  # (C, h, w)
        if self.conditioning == "text":
            text = f.get_slice("text")[row].to(torch.float32)  # (L, D)
            mask = f.get_slice("text_mask")[row].to(torch.int64)  # (L,)
            return latent, {"text": text, "text_mask": mask}
        label = f.get_slice("labels")[row].to(torch.int64)
        return latent, label

    def caption(self, index: int) -> str:
        """The caption of item `index` (captioned folders only)."""
        if self.conditioning != "text":
            raise ValueError(f"{self.folder} holds class labels, not captions")
        k, row, _ = self._locate(index)
        return shard_captions(self.folder / shard_name(k))[row]

    def __getstate__(self) -> dict[str, Any]:
        # Open handles cannot be pickled (spawn/forkserver workers): each worker reopens.
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def __repr__(self) -> str:
        what = f"text {self.text_shape}" if self.conditioning == "text" else f"{self.num_classes} classes"
        return (
            f"LatentShardDataset({str(self.folder)!r}: {self.num_images} images x {self.variants} variants, "
            f"latents {self.latent_shape}, {what})"
        )
