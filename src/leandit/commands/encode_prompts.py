"""`leandit encode-prompts`: prompts -> the prompt embeddings a text-conditioned model samples from."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data.text import encode_prompts, read_prompts


def add_parser(sub) -> None:
    p = sub.add_parser(
        "encode-prompts",
        help="embed prompts with a local PixArt pipeline's text encoder, for 'leandit sample --prompts'",
        description="Embed each prompt, and the empty prompt used for guidance, exactly as the pipeline's "
        "encode_prompt does (T5 tokenizer padded to --max-length, attention mask, the encoder's last hidden "
        "state) and write them to one .safetensors file: text (P, L, D), text_mask (P, L), null_text (L, D), "
        "null_text_mask (L,), the prompts and the text encoder's fingerprint in its header.",
    )
    p.add_argument("--pipeline", type=Path, required=True,
                   help="local diffusers PixArtAlphaPipeline / PixArtSigmaPipeline folder (model_index.json, tokenizer/, text_encoder/)")
    p.add_argument("--prompts", nargs="+", required=True, metavar="FILE_OR_TEXT",
                   help="prompt texts, or files holding them: .txt one prompt per line, .json a list of strings")
    p.add_argument("--out", type=Path, required=True, help="output file, e.g. prompts.safetensors")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per prompt; default the pipeline's (120 PixArt-Alpha, 300 PixArt-Sigma); use the training data's")
    p.add_argument("--text-encoder-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="precision the text encoder runs in (default float32)")
    p.add_argument("--clean-caption", action="store_true",
                   help="the pipeline's caption cleaning (needs beautifulsoup4 and ftfy) instead of lower-case + strip")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="storage precision of the embeddings (default float32)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per text encoder pass (default 32)")
    p.add_argument("--device", default="auto", help="auto (a GPU if there is one, else CPU), cpu, cuda or cuda:N (default auto)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    prompts = read_prompts(args.prompts)
    meta = encode_prompts(
        args.pipeline,
        prompts,
        args.out,
        max_length=args.max_length,
        text_encoder_dtype=args.text_encoder_dtype,
        clean_caption=args.clean_caption,
        dtype=args.dtype,
        batch_size=args.batch_size,
        device=args.device,
    )
    L, D = meta["text_shape"]
    print(f"encode-prompts: {len(prompts)} prompts and the empty prompt -> {args.out} ({L} tokens x {D} per prompt, "
          f"{meta['pipeline_class']}, text encoder {meta['text_encoder_sha256']})")
    return 0
