"""Bytes per sample of precomputed SD3-style shards: latents, CLIP tokens, and T5 states stored trimmed to each
caption's tokens against padded to 256, and their total for CommonCatalog-C.

The sizes are those of the columns ``python -m diffusion.pipeline precompute`` writes for the ``sd3`` conditioner
(:meth:`diffusion.models.t5_conditioners.SD3TextConditioner.stored_text_columns`): ``image_latents_mean`` and
``image_latents_std`` (16 channels, VAE factor 8, ``--store moments``; half with ``--store sample``),
``clip_embeds`` (77 x (768 + 1280)), ``pooled_text_embeds`` (2048) and ``t5_embeds`` (L_i x 4096), all at 2 bytes
(fp16 or bf16). The T5 token lengths: measured on the synthetic captions with the project's offline T5 tokenizer
(one piece per word, plus ``</s>``), and an assumption for real captions, stated in ``--real-tokens`` (default: a
mean of 32 tokens, i.e. a ~20-word BLIP-2-style caption at ~1.5 SentencePiece tokens per word plus ``</s>``).
MDS's own per-sample overhead (a few dozen bytes of headers, the text columns) is left out.

    python benchmarks/t5_embedding_bytes.py
"""

from __future__ import annotations

import argparse
import statistics

from diffusion.data.synthetic import caption_corpus
from diffusion.models.t5 import build_t5_tokenizer

COMMONCATALOG_C = 26_232_417  # images in CommonCatalog-C (commercial licenses)
BYTES = 2  # fp16 / bf16
T5_WIDTH = 4096  # T5 v1.1 XXL d_model
CLIP_TOKENS, CLIP_WIDTH, POOLED = 77, 768 + 1280, 768 + 1280
LATENT_CHANNELS, VAE_FACTOR = 16, 8
MAX_LENGTH = 256


def latent_bytes(resolution: int, moments: bool = True) -> int:
    side = resolution // VAE_FACTOR
    return (2 if moments else 1) * LATENT_CHANNELS * side * side * BYTES


def t5_bytes(tokens: float) -> float:
    return tokens * T5_WIDTH * BYTES


def synthetic_token_lengths() -> list[int]:
    tokenizer = build_t5_tokenizer(max_length=MAX_LENGTH)
    return [len(ids) for ids in tokenizer(caption_corpus())['input_ids']]


def human(n: float) -> str:
    for unit, size in (('TB', 1e12), ('GB', 1e9), ('MB', 1e6), ('kB', 1e3)):
        if n >= size:
            return f'{n / size:,.1f} {unit}'
    return f'{n:,.0f} B'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--real-tokens', type=float, default=32.0, help='Assumed mean T5 tokens of real captions.')
    args = parser.parse_args()
    lengths = synthetic_token_lengths()
    synthetic = statistics.mean(lengths)
    print(
        f'synthetic captions: {len(lengths)}, T5 tokens mean {synthetic:.1f}, min {min(lengths)}, max {max(lengths)}; '
        f'real captions (assumed): mean {args.real_tokens:.0f}'
    )
    clip = (CLIP_TOKENS * CLIP_WIDTH + POOLED) * BYTES
    print('| resolution | T5 tokens stored | latents | CLIP + pooled | T5 states | per sample | CommonCatalog-C |')
    print('|---|---|---:|---:|---:|---:|---:|')
    for resolution in (256, 512):
        latents = latent_bytes(resolution)
        for label, tokens in (
            (f'trimmed, synthetic (mean {synthetic:.1f})', synthetic),
            (f'trimmed, real (assumed mean {args.real_tokens:.0f})', args.real_tokens),
            (f'padded to {MAX_LENGTH}', MAX_LENGTH),
        ):
            t5 = t5_bytes(tokens)
            total = latents + clip + t5
            print(
                f'| {resolution} px | {label} | {human(latents)} | {human(clip)} | {human(t5)} | {human(total)} | '
                f'{human(total * COMMONCATALOG_C)} |'
            )


if __name__ == '__main__':
    main()
