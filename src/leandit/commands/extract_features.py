"""`leandit extract-features`: an image folder -> sharded SD-VAE latents (and, for captioned
images, the prompt embeddings of a PixArt pipeline) for training."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data.features import extract_features


def add_parser(sub) -> None:
    p = sub.add_parser(
        "extract-features",
        help="encode an image folder into VAE latent shards, with class labels or caption embeddings (the training data of latent models)",
        description="Encode IMAGE_ROOT with a diffusers AutoencoderKL into .safetensors shards that "
        "'leandit train --data OUT' reads. Class labels: IMAGE_ROOT has one sub-folder per class, --vae names "
        "the VAE. Captions: --pipeline names a local PixArt pipeline folder whose tokenizer and text encoder "
        "embed each caption exactly as the pipeline's encode_prompt does (and whose vae/ encodes the images "
        "unless --vae is given); IMAGE_ROOT may be flat or nested. Images get the ADM center crop; each "
        "image is stored with the latent of its horizontal flip, and the VAE sample is seeded per image, so "
        "the result does not depend on the batch size or the number of processes. Run under torchrun to "
        "split the shards over processes (RANK / WORLD_SIZE). Rerunning the same command skips complete "
        "shards and finishes an interrupted extraction.",
    )
    p.add_argument("image_root", type=Path,
                   help="image folder; for class labels (and --captions class-names) in ImageNet layout: IMAGE_ROOT/CLASS/IMAGE.jpg, "
                   "labels follow the sorted class names")
    p.add_argument("--vae", type=Path, default=None,
                   help="local diffusers AutoencoderKL folder (e.g. stabilityai/sd-vae-ft-ema saved with save_pretrained) or MAR's "
                   "KL-16 file (kl16.ckpt); "
                   "needed for class labels, overrides the pipeline's vae/ for captions")
    text = p.add_argument_group("captioned images (text conditioning)")
    text.add_argument("--pipeline", type=Path, default=None,
                      help="local diffusers PixArtAlphaPipeline / PixArtSigmaPipeline folder (model_index.json, tokenizer/, "
                      "text_encoder/, vae/; the transformer is not loaded)")
    text.add_argument("--captions", default=None, metavar="FILE|txt|class-names",
                      help='FILE.json {"DIR/IMAGE.jpg": "caption", ...} or FILE.jsonl lines {"file_name": "DIR/IMAGE.jpg", "text": "caption"} '
                      "(paths relative to IMAGE_ROOT); txt: IMAGE.txt beside each image; class-names: the class folder name, '_' as space")
    text.add_argument("--max-length", type=int, default=None,
                      help="tokens per caption (padded and truncated); default the pipeline's: 120 PixArt-Alpha, 300 PixArt-Sigma")
    text.add_argument("--text-encoder-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                      help="precision the text encoder runs in (default float32; bfloat16 halves T5-XXL's 19 GB)")
    text.add_argument("--clean-caption", action="store_true",
                      help="the pipeline's caption cleaning (URLs, HTML, ...; needs beautifulsoup4 and ftfy) instead of lower-case + strip")
    p.add_argument("--out", type=Path, required=True, help="output folder for index.json and the shard-NNNNN.safetensors files")
    p.add_argument("--resolution", type=int, default=256,
                   help="image size after the center crop; latents are resolution/8 for SD-VAEs (default 256)")
    p.add_argument("--shard-size", type=int, default=1024,
                   help="images per shard file; also the unit of work that a resume redoes (default 1024)")
    p.add_argument("--batch-size", type=int, default=32, help="images per VAE forward pass; does not change the result (default 32)")
    p.add_argument("--no-flip", action="store_true",
                   help="store only the image's latent, not also its horizontal flip (halves the size and the items)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                   help="storage precision of the latents and caption embeddings (default float16: half the disk, ample for training)")
    p.add_argument("--seed", type=int, default=0, help="seed of the VAE posterior samples; image i, variant v uses (seed, i, v) (default 0)")
    p.add_argument("--device", default="auto", help="auto (this process's GPU if there is one, else CPU), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    summary = extract_features(
        args.image_root,
        args.vae,
        args.out,
        pipeline=args.pipeline,
        captions=args.captions,
        max_length=args.max_length,
        text_encoder_dtype=args.text_encoder_dtype,
        clean_caption=args.clean_caption,
        resolution=args.resolution,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        flip=not args.no_flip,
        dtype=args.dtype,
        seed=args.seed,
        device=args.device,
        progress=not args.quiet,
    )
    who = f" (rank {summary['rank']} of {summary['world_size']})" if summary["world_size"] > 1 else ""
    state = "complete" if summary["complete"] else "incomplete: other processes are still writing, or rerun to finish"
    print(
        f"extract-features{who}: encoded {summary['images']} images into {summary['shards_written']} shards, "
        f"skipped {summary['shards_skipped']} complete shards, in {summary['seconds']:.1f} s; "
        f"{summary['out']} has {summary['num_shards']} shards of {summary['total_images']} images ({state})"
    )
    return 0
