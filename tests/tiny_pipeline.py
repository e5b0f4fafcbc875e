"""A tiny PixArt pipeline folder built from configs, offline: a T5 tokenizer over a fixed
word list, a 1-layer T5 encoder, a 2-level AutoencoderKL and a 1-block PixArt transformer.

`PixArtAlphaPipeline.from_pretrained(build_tiny_pipeline(folder))` loads and runs it (use
`use_resolution_binning=False`: the transformer's sample_size is not a PixArt size).
"""

from __future__ import annotations

from pathlib import Path

import torch

# Lower-case words (the pipeline lower-cases prompts); any other word becomes <unk>.
WORDS = (
    "a an the of on in with and photo picture drawing painting cat dog bird car house tree red green blue "
    "black white small big sofa street zero one two three four five six seven eight nine"
).split()
TEXT_DIM = 16  # the T5 encoder's d_model, the transformer's caption_channels
PIPELINES = {"alpha": "PixArtAlphaPipeline", "sigma": "PixArtSigmaPipeline"}


def tiny_tokenizer():
    """A T5Tokenizer (Unigram, as the real spiece one) over WORDS: <pad> 0, </s> 1, <unk> 2."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -8.0)]
    vocab += [("\u2581" + w, -1.0 - i / 100) for i, w in enumerate(WORDS)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_text_encoder(vocab_size: int, seed: int = 0, d_model: int = TEXT_DIM):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(d_model=d_model, num_layers=1, num_heads=2, d_kv=8, d_ff=32, vocab_size=vocab_size)
    return T5EncoderModel(config).eval()


def tiny_vae(seed: int = 0):
    """The 2-level AutoencoderKL of tests/test_extract_features.py (downsampling 2, 4 channels)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    with torch.no_grad():  # random init gives a near-constant log-variance; spread it so std * noise matters
        vae.quant_conv.bias.copy_(torch.linspace(-1, 1, 8))
    return vae.eval()


def tiny_transformer(seed: int = 0, sample_size: int = 8, num_layers: int = 1, caption_channels: int = TEXT_DIM):
    """A PixArtTransformer2DModel on 4-channel sample_size^2 latents (learned sigma: 8 out)."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=num_layers,
        cross_attention_dim=16,
        norm_num_groups=8,
        sample_size=sample_size,
        caption_channels=caption_channels,
    ).eval()


def build_tiny_pipeline(folder: str | Path, kind: str = "alpha", seed: int = 0, num_layers: int = 1) -> Path:
    """Write a complete tiny pipeline folder (model_index.json, tokenizer/, text_encoder/,
    vae/, transformer/, scheduler/) with save_pretrained, as a downloaded one looks; return it.

    kind "alpha" writes a PixArtAlphaPipeline (prompts of 120 tokens), "sigma" a
    PixArtSigmaPipeline (300). The same seed gives the same weights.
    """
    import diffusers
    from diffusers import DPMSolverMultistepScheduler

    tokenizer = tiny_tokenizer()
    pipeline = getattr(diffusers, PIPELINES[kind])(
        tokenizer=tokenizer,
        text_encoder=tiny_text_encoder(len(tokenizer), seed),
        vae=tiny_vae(seed),
        transformer=tiny_transformer(seed, num_layers=num_layers),
        scheduler=DPMSolverMultistepScheduler(),
    )
    folder = Path(folder)
    pipeline.save_pretrained(folder)
    return folder
