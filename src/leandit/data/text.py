"""Text conditioning: the captions of an image folder, and prompt embeddings computed by a
local diffusers PixArt pipeline folder's own `encode_prompt`.

Captions (`--captions` of `leandit extract-features`), each keyed by the image's path relative
to the image root, with '/' between folders:

    FILE.json     one JSON object {"dogs/a.jpg": "a dog on a red sofa", ...}
    FILE.jsonl    one JSON object per line {"file_name": "dogs/a.jpg", "text": "a dog ..."}
                  (the metadata.jsonl layout of Hugging Face image folders)
    txt           the caption of IMAGE.jpg is the text of IMAGE.txt beside it
    class-names   the caption is the image's class folder name with '_' as a space
                  (ROOT/red_dog/1.png -> "red dog"); the folder must be in ImageNet layout

Every image needs a caption; captions of files that are not there are ignored.

Prompt embeddings are those of the pipeline: the T5 tokenizer pads (and truncates) to
`max_length` tokens - 120 for PixArtAlphaPipeline, 300 for PixArtSigmaPipeline, as their
`encode_prompt` defaults - the mask is 1 on real tokens (the closing </s> included), and the
embedding is the encoder's last hidden state at every position, padding included. The
pipeline lower-cases and strips each prompt first. The empty prompt "" is the pipeline's
negative prompt: its embedding is the "null" condition of label dropout and guidance.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from . import latents as fmt

# Pipeline classes whose prompts leandit encodes, with their encode_prompt's default
# max_sequence_length (diffusers 0.42: pipeline_pixart_alpha.py / pipeline_pixart_sigma.py).
PIPELINE_MAX_LENGTH = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}
TEXT_ENCODER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PIPELINE_HINT = (
    "pass a local diffusers PixArt pipeline folder (model_index.json, tokenizer/, text_encoder/, vae/), "
    "e.g. PixArt-alpha/PixArt-XL-2-512x512 downloaded with 'huggingface-cli download REPO --local-dir DIR'"
)
CAPTION_KEYWORDS = ("txt", "class-names")

PROMPTS_FORMAT = "leandit-prompt-embeddings"
PROMPTS_VERSION = 1


# ----------------------------------------------------------------------------- captions


def _relative_key(name: str) -> str:
    """A caption file's key as the posix path relative to the root ("./a\\b.jpg" -> "a/b.jpg")."""
    key = name.replace("\\", "/")
    while key.startswith("./"):
        key = key[2:]
    return key


def read_caption_file(path: str | os.PathLike) -> dict[str, str]:
    """{relative image path: caption} from a .json object or a .jsonl of {"file_name", "text"} lines."""
    path = Path(path)
    layout = 'a .json object {"DIR/IMAGE.jpg": "caption", ...} or a .jsonl with one {"file_name": ..., "text": ...} per line'
    if not path.is_file():
        raise FileNotFoundError(f"no caption file at {path}: pass {layout}, or --captions txt / class-names")
    if path.suffix.lower() not in (".json", ".jsonl"):
        raise ValueError(f"caption file {path} is neither .json nor .jsonl: pass {layout}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read caption file {path}: {err}") from None
    captions: dict[str, str] = {}
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as err:
            raise ValueError(f"caption file {path} is not valid JSON ({err}): pass {layout}") from None
        if not isinstance(data, dict):
            raise ValueError(f"caption file {path} holds a JSON {type(data).__name__}, not an object: pass {layout}")
        items = list(data.items())
        where = {key: "" for key, _ in items}
    else:
        items, where = [], {}
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise ValueError(f"caption file {path} line {number} is not valid JSON ({err}): pass {layout}") from None
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or "text" not in row:
                raise ValueError(f'caption file {path} line {number} has no "file_name" and "text": pass {layout}')
            items.append((row["file_name"], row["text"]))
            where[row["file_name"]] = f" line {number}"
    for name, caption in items:
        if not isinstance(caption, str):
            raise ValueError(f"caption file {path}{where[name]}: the caption of {name!r} is a {type(caption).__name__}, not a string")
        key = _relative_key(name)
        if key in captions and captions[key] != caption:
            raise ValueError(f"caption file {path}{where[name]} gives {key!r} a second, different caption")
        captions[key] = caption
    return captions


def list_all_images(image_root: str | os.PathLike) -> list[Path]:
    """Every image under `image_root` (flat or nested), sorted by the relative path; hidden
    files and folders are skipped, as by `features.list_images`."""
    from .features import IMAGE_EXTENSIONS

    root = Path(image_root)
    if not root.is_dir():
        raise FileNotFoundError(f"no image folder at {root}: pass a folder of images (flat or in sub-folders)")
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [
            Path(os.path.relpath(os.path.join(dirpath, f), root)).as_posix()
            for f in filenames
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
        ]
    if not found:
        raise ValueError(f"no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) under {root}")
    return [root / rel for rel in sorted(found)]


def captioned_images(image_root: str | os.PathLike, captions: str | os.PathLike) -> tuple[list[Path], list[str], list[str] | None]:
    """(paths, captions, class_names) of an image folder, in the global order.

    `captions` is a caption file, "txt" or "class-names" (see the module docstring);
    class_names is the sorted class list for "class-names" and None otherwise.
    """
    from .features import list_images

    root = Path(image_root)
    source = str(captions)
    if source == "class-names":
        paths, labels, class_names = list_images(root)
        return paths, [class_names[label].replace("_", " ") for label in labels], class_names
    paths = list_all_images(root)
    if source == "txt":
        texts, missing = [], []
        for p in paths:
            side = p.with_suffix(".txt")
            if side.is_file():
                try:
                    texts.append(side.read_text(encoding="utf-8").strip())
                except (OSError, UnicodeDecodeError) as err:
                    raise ValueError(f"cannot read caption {side}: {err}") from None
            else:
                missing.append(p.relative_to(root).as_posix())
        fix = "write IMAGE.txt beside each IMAGE (or pass --captions FILE.json / FILE.jsonl)"
    else:
        table = read_caption_file(source)
        keys = [p.relative_to(root).as_posix() for p in paths]
        missing = [key for key in keys if key not in table]
        texts = [table.get(key, "") for key in keys]
        fix = f"add them to {source} (keys are paths relative to {root}, e.g. {keys[0]!r}), or remove the images"
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ValueError(f"{len(missing)} of {len(paths)} images under {root} have no caption ({shown}): {fix}")
    return paths, texts, None


def captions_fingerprint(captions: Sequence[str]) -> str:
    """A hash of the caption list in image order: a resume with other captions is refused."""
    return hashlib.sha256(json.dumps(list(captions), ensure_ascii=False).encode()).hexdigest()


# ----------------------------------------------------------------------------- pipelines


def read_pipeline(folder: str | os.PathLike) -> dict[str, Any]:
    """Check a pipeline folder for what prompt encoding needs, without loading weights.

    Returns {"folder", "class_name", "max_length" (the pipeline's default), "text_dim"}; a
    missing part is a one-line error that names it and the fix.
    """
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"no pipeline folder at {path}: {PIPELINE_HINT}")
    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{path} has no model_index.json, so it is not a diffusers pipeline folder: {PIPELINE_HINT}")
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {index_path}: {err}; {PIPELINE_HINT}") from None
    class_name = index.get("_class_name") if isinstance(index, dict) else None
    if class_name not in PIPELINE_MAX_LENGTH:
        raise ValueError(
            f"{path} holds a {class_name} (model_index.json), leandit encodes prompts for "
            f"{' and '.join(PIPELINE_MAX_LENGTH)} folders: {PIPELINE_HINT}"
        )
    for part, what in (("tokenizer", "tokenizer files"), ("text_encoder", "config.json + weights")):
        listed = index.get(part)
        if not (isinstance(listed, list) and listed and listed[0]) or not (path / part).is_dir() or not any((path / part).iterdir()):
            raise FileNotFoundError(
                f"{path} has no {part}/ ({what}), which prompt embeddings need: download the whole pipeline "
                f"(model_index.json with {part}, {part}/), not only the transformer"
            )
    config_path = path / "text_encoder" / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path / 'text_encoder'} has no config.json: download the whole text_encoder/ folder of the pipeline")
    try:
        config = json.loads(config_path.read_text())
        text_dim = int(config.get("d_model") or config["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"cannot read the text encoder's width (d_model) from {config_path}: {err}") from None
    return {"folder": str(path.resolve()), "class_name": class_name, "max_length": PIPELINE_MAX_LENGTH[class_name], "text_dim": text_dim}


def _files_hash(folder: Path) -> str:
    """A hash of every file in a folder, names and bytes (a tokenizer's few small files)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def text_fingerprints(folder: str | os.PathLike) -> dict[str, str]:
    """{"text_encoder_sha256", "tokenizer_sha256"} of a pipeline folder (reads every weight
    byte once: a few seconds per GB)."""
    from .vae import model_fingerprint

    path = Path(folder)
    return {"text_encoder_sha256": model_fingerprint(path / "text_encoder"), "tokenizer_sha256": _files_hash(path / "tokenizer")}


class PromptEncoder:
    """Prompt embeddings from a local PixArt pipeline folder, by the pipeline's own
    `encode_prompt` on a pipeline built from the folder's tokenizer and text encoder (the
    transformer, VAE and scheduler are not loaded).

    Args:
        folder: the pipeline folder (checked by `read_pipeline`).
        device: where the text encoder runs.
        max_length: tokens per prompt; default the pipeline's (120 Alpha, 300 Sigma).
        dtype: the text encoder's precision ("float32", "bfloat16" or "float16"); outputs are
            returned as float32 whatever it is.
        clean_caption: the pipeline's caption cleaning (needs the bs4 and ftfy packages);
            False lower-cases and strips, as the pipeline does without them.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        max_length: int | None = None,
        dtype: str = "float32",
        clean_caption: bool = False,
    ):
        self.info = read_pipeline(folder)
        self.max_length = int(max_length or self.info["max_length"])
        check_text_options(self.max_length, dtype, clean_caption)
        self.device = torch.device(device)
        self.clean_caption = bool(clean_caption)
        _check_tokenizer_backend(Path(folder) / "tokenizer")
        import diffusers

        cls = getattr(diffusers, self.info["class_name"])
        try:
            with _quiet_loading():
                self.pipeline = cls.from_pretrained(
                    str(folder), transformer=None, vae=None, scheduler=None, dtype=TEXT_ENCODER_DTYPES[dtype], local_files_only=True
                )
        except (ImportError, OSError, ValueError, RuntimeError, TypeError) as err:
            raise ValueError(f"cannot load the tokenizer and text encoder of {folder}: {str(err).splitlines()[0]}; {PIPELINE_HINT}") from None
        self.pipeline.text_encoder.to(self.device).eval()
        self.pipeline.set_progress_bar_config(disable=True)

    @property
    def text_shape(self) -> tuple[int, int]:
        """(L, D): tokens per prompt and the encoder's width."""
        return self.max_length, int(self.info["text_dim"])

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings (P, L, D) float32, mask (P, L) int64), on the CPU."""
        embeds, mask, _, _ = self.pipeline.encode_prompt(
            list(prompts),
            do_classifier_free_guidance=False,
            device=self.device,
            clean_caption=self.clean_caption,
            max_sequence_length=self.max_length,
        )
        return embeds.float().cpu(), mask.to(torch.int64).cpu()  # (P, L, D), (P, L)

    def null(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt "" - the pipeline's negative prompt: ((L, D), (L,))."""
        embeds, mask = self.encode([""])
        return embeds[0], mask[0]


def _check_tokenizer_backend(folder: Path) -> None:
    """Hub T5 tokenizers may ship only spiece.model (no tokenizer.json); transformers converts
    it with the sentencepiece and protobuf packages, which leandit does not otherwise need."""
    if (folder / "tokenizer.json").is_file() or not (folder / "spiece.model").is_file():
        return
    from transformers.utils import is_protobuf_available, is_sentencepiece_available

    if not (is_sentencepiece_available() and is_protobuf_available()):
        raise ValueError(
            f"{folder} holds only a SentencePiece model (spiece.model, no tokenizer.json), which transformers reads "
            "with the sentencepiece and protobuf packages: pip install sentencepiece protobuf"
        )


@contextlib.contextmanager
def _quiet_loading():
    """No "Loading pipeline components" / "Loading weights" bars (diffusers, transformers)
    while two small components load; the previous setting is restored."""
    from diffusers.utils import logging as d_logging
    from transformers.utils import logging as t_logging

    states = [(m, m.is_progress_bar_enabled()) for m in (d_logging, t_logging)]
    for m, _ in states:
        m.disable_progress_bar()
    try:
        yield
    finally:
        for m, enabled in states:
            if enabled:
                m.enable_progress_bar()


def check_text_options(max_length: int, dtype: str, clean_caption: bool) -> None:
    if int(max_length) < 1:
        raise ValueError(f"the maximum prompt length must be at least 1 token, got {max_length}")
    if dtype not in TEXT_ENCODER_DTYPES:
        raise ValueError(f"the text encoder dtype must be one of {', '.join(TEXT_ENCODER_DTYPES)}, got {dtype!r}")
    if clean_caption:
        from diffusers.utils import is_bs4_available, is_ftfy_available

        if not (is_bs4_available() and is_ftfy_available()):
            raise ValueError("caption cleaning needs the bs4 and ftfy packages: pip install beautifulsoup4 ftfy, or leave it off")


# ----------------------------------------------------------------------------- prompt files


def read_prompts(specs: Sequence[str]) -> list[str]:
    """Prompts from command-line arguments: a .txt file (one prompt per line, blank lines
    skipped), a .json file (a list of strings), or else the argument is the prompt itself."""
    prompts: list[str] = []
    for spec in specs:
        path = Path(spec)
        suffix = path.suffix.lower()
        if suffix in (".txt", ".json") and not path.is_file():
            raise FileNotFoundError(f"no prompt file at {path}: pass a .txt (one prompt per line), a .json list, or the prompt text")
        if suffix == ".txt":
            prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        elif suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as err:
                raise ValueError(f"prompt file {path} is not valid JSON ({err}): pass a list of strings") from None
            if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
                raise ValueError(f"prompt file {path} must hold a JSON list of strings")
            prompts += data
        else:
            prompts.append(spec)
    if not prompts:
        raise ValueError("no prompts given: pass prompt texts or files holding them")
    return prompts


def encode_prompts(
    pipeline: str | os.PathLike,
    prompts: Sequence[str],
    out: str | os.PathLike,
    *,
    max_length: int | None = None,
    text_encoder_dtype: str = "float32",
    clean_caption: bool = False,
    dtype: str = "float32",
    batch_size: int = 32,
    device: str | torch.device = "auto",
) -> dict[str, Any]:
    """Write the prompt embeddings of `prompts` and of "" to the safetensors file `out`.

    Tensors: text (P, L, D) and null_text (L, D) in `dtype`, text_mask (P, L) and
    null_text_mask (L,) int64; the header's "leandit" entry (JSON) holds the prompts and what
    made them (pipeline, max_length, fingerprints). Returns that metadata.
    """
    from safetensors.torch import save_file

    if dtype not in fmt.DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(fmt.DTYPES)}, got {dtype!r}")
    if int(batch_size) < 1:
        raise ValueError(f"the batch size must be at least 1, got {batch_size}")
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: pass a file name such as prompts.safetensors")
    from .features import _resolve_device

    prompts = list(prompts)
    encoder = PromptEncoder(pipeline, device=_resolve_device(device), max_length=max_length, dtype=text_encoder_dtype, clean_caption=clean_caption)
    parts = [encoder.encode(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
    null_text, null_mask = encoder.null()
    store = fmt.DTYPES[dtype]
    tensors = {
        "text": torch.cat([p[0] for p in parts]).to(store).contiguous(),  # (P, L, D)
        "text_mask": torch.cat([p[1] for p in parts]).contiguous(),  # (P, L)
        "null_text": null_text.to(store).contiguous(),  # (L, D)
        "null_text_mask": null_mask.contiguous(),  # (L,)
    }
    meta = {
        "format": PROMPTS_FORMAT,
        "version": PROMPTS_VERSION,
        "prompts": prompts,
        "pipeline": encoder.info["folder"],
        "pipeline_class": encoder.info["class_name"],
        "max_length": encoder.max_length,
        "text_shape": list(encoder.text_shape),
        "text_encoder_dtype": text_encoder_dtype,
        "clean_caption": bool(clean_caption),
        "dtype": dtype,
        **text_fingerprints(pipeline),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    header = {fmt.HEADER_KEY: json.dumps(meta, sort_keys=True, ensure_ascii=False)}
    fmt.atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata=header))
    return meta


def load_prompt_embeddings(path: str | os.PathLike) -> dict[str, Any]:
    """Read a file written by `leandit encode-prompts`.

    Returns {"text": float32 (P, L, D), "text_mask": int64 (P, L), "null_text": float32 (L, D),
    "null_text_mask": int64 (L,), "prompts": list of P strings, "meta": the header (pipeline,
    pipeline_class, max_length, text_shape, text_encoder_sha256, tokenizer_sha256, ...)}.
    """
    from safetensors import safe_open

    path = Path(path)
    make = f"run 'leandit encode-prompts --pipeline PIPELINE --prompts TEXT_OR_FILE... --out {path}'"
    if not path.is_file():
        raise FileNotFoundError(f"no prompt embeddings at {path}: {make} first")
    want = ("text", "text_mask", "null_text", "null_text_mask")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(fmt.HEADER_KEY, "{}"))
            if meta.get("format") != PROMPTS_FORMAT:
                raise ValueError("format")
            tensors = {name: f.get_tensor(name) for name in want if name in f.keys()}
    except Exception:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{path} is not a prompt embedding file of leandit: {make}") from None
    if meta.get("version") != PROMPTS_VERSION:
        raise ValueError(f"{path} has format version {meta.get('version')}, this leandit reads version {PROMPTS_VERSION}: {make}")
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    P, (L, D) = len(meta.get("prompts", [])), tuple(meta.get("text_shape", (0, 0)))
    expected = {"text": (P, L, D), "text_mask": (P, L), "null_text": (L, D), "null_text_mask": (L,)}
    if shapes != expected:
        raise ValueError(f"{path} holds tensors {shapes}, its header implies {expected}: {make} again")
    return {
        "text": tensors["text"].float(),
        "text_mask": tensors["text_mask"].to(torch.int64),
        "null_text": tensors["null_text"].float(),
        "null_text_mask": tensors["null_text_mask"].to(torch.int64),
        "prompts": list(meta["prompts"]),
        "meta": meta,
    }
