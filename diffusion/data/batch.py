"""The batch contract: every key a training batch may hold, with its shape, dtype, producer and consumer.

A batch is a dict, the one interface between the data layer and the models. The datasets
(:mod:`diffusion.data.image_caption`, :mod:`diffusion.data.latents`) and the precompute stage produce these keys;
the model's components consume them (the autoencoder path the image keys, the text conditioner the text and
micro-conditioning keys); callbacks read the accounting keys. Code that reads or writes a key imports its name from
here, so that a renamed key is one edit and a test (``tests/data/test_batch.py``) checks that what the datasets
yield matches this table.

Shapes are per batch: ``B`` the batch size, ``H x W`` the image size, ``f`` the autoencoder's downsampling factor,
``C`` its latent channels, ``L`` the tokenizer's maximum length, ``D`` the text embedding width and ``P`` the
pooled embedding width. Latents in a batch are never scaled: the model applies the autoencoder's scale (and shift)
in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    'BATCH_KEYS',
    'CONDITIONING_KEYS',
    'IMAGE_LATENT_KEYS',
    'MICRO_CONDITIONING_KEYS',
    'BatchKey',
    'describe_batch_keys',
]


@dataclass(frozen=True)
class BatchKey:
    """One key of the batch dict.

    Attributes:
        name (str): The key.
        shape (str): Its shape per batch.
        dtype (str): Its dtype after collation.
        producer (str): What writes it.
        consumer (str): What reads it.
    """

    name: str
    shape: str
    dtype: str
    producer: str
    consumer: str


BATCH_KEYS: dict[str, BatchKey] = {
    key.name: key
    for key in (
        BatchKey('image', '(B, 3, H, W) in [-1, 1]', 'float32', 'image_caption dataset', 'model: autoencoder encode'),
        BatchKey('captions', 'list of B str', 'str', 'image_caption and latents datasets', 'text conditioner'),
        BatchKey(
            'input_ids', '(B, L)', 'int64', 'image_caption dataset (first tokenizer, in workers)', 'text conditioner'
        ),
        BatchKey('input_ids_2', '(B, L)', 'int64', 'callers of SDXL conditioner.tokenize', 'SDXL text conditioner'),
        BatchKey(
            'image_latents_mean',
            '(B, C, H/f, W/f), unscaled',
            'float32',
            'latents dataset (precompute --store moments)',
            'model: samples the posterior with the draw the image path makes',
        ),
        BatchKey('image_latents_std', '(B, C, H/f, W/f)', 'float32', 'latents dataset', 'model (with the mean)'),
        BatchKey('image_latents', '(B, C, H/f, W/f), unscaled', 'float32', 'latents dataset (--store sample)', 'model'),
        BatchKey('text_embeds', '(B, L, D)', 'float32', 'latents dataset (precompute)', 'text conditioner'),
        BatchKey(
            'pooled_text_embeds',
            '(B, P)',
            'float32',
            'latents dataset (SDXL, SD3 precompute)',
            'SDXL, SD3 conditioners',
        ),
        BatchKey(
            't5_embeds',
            '(B, max_length, D), zeros after each caption',
            'float32',
            'latents dataset (t5, sd3 precompute: stored trimmed, padded back)',
            't5 and sd3 text conditioners',
        ),
        BatchKey('t5_attention_mask', '(B, max_length)', 'int64', 'latents dataset (with t5_embeds)', '(informative)'),
        BatchKey('clip_embeds', '(B, 77, D_L + D_G)', 'float32', 'latents dataset (sd3 precompute)', 'sd3 conditioner'),
        BatchKey('input_ids_3', '(B, max_length)', 'int64', 'callers of sd3 conditioner.tokenize', 'sd3 conditioner'),
        BatchKey(
            'cond_original_size',
            '(B, 2) (height, width)',
            'int64',
            'image_caption (micro_conditioning) and latents datasets',
            'SDXL text conditioner (time_ids)',
        ),
        BatchKey(
            'cond_crops_coords_top_left',
            '(B, 2) (top, left)',
            'int64',
            'image_caption (micro_conditioning) and latents datasets',
            'SDXL text conditioner (time_ids)',
        ),
        BatchKey(
            'cond_target_size',
            '(B, 2) (height, width)',
            'int64',
            'image_caption (micro_conditioning) and latents datasets',
            'SDXL text conditioner (time_ids)',
        ),
        BatchKey('sample_index', '(B,)', 'int64', 'all datasets', 'sample_ledger callback, replacement logs'),
        BatchKey(
            'replaced',
            '(B,) 1 where an unusable sample was replaced',
            'int64',
            'FaultTolerantStreamingDataset',
            'replaced_sample_monitor callback',
        ),
    )
}

# The posterior's moments or one sample of it: a batch holding either skips the autoencoder.
IMAGE_LATENT_KEYS = ('image_latents_mean', 'image_latents_std', 'image_latents')
# SDXL's size and crop conditioning, in the order its UNet's time ids concatenate them.
MICRO_CONDITIONING_KEYS = ('cond_original_size', 'cond_crops_coords_top_left', 'cond_target_size')
# What a text conditioner hands the denoiser (not batch keys: the model derives them from the keys above).
CONDITIONING_KEYS = ('text_embeds', 'pooled_text_embeds', 'time_ids', 'text_attention_mask')


def describe_batch_keys() -> str:
    """The contract as a Markdown table, for documentation."""
    rows = ['| key | shape | dtype | producer | consumer |', '|---|---|---|---|---|']
    rows += [f'| `{k.name}` | {k.shape} | {k.dtype} | {k.producer} | {k.consumer} |' for k in BATCH_KEYS.values()]
    return '\n'.join(rows)
