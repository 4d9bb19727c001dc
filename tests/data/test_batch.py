"""The batch contract in code: what the datasets yield and what the model's components read are keys of
diffusion.data.batch, with the dtypes it states."""

from __future__ import annotations

import torch

from diffusion.data.batch import BATCH_KEYS, IMAGE_LATENT_KEYS, MICRO_CONDITIONING_KEYS, describe_batch_keys
from diffusion.data.image_caption import build_image_caption_dataloader
from diffusion.data.latents import LATENT_COLUMNS
from tests.conftest import build_tiny_sd, build_tiny_sdxl

DTYPES = {'float32': torch.float32, 'int64': torch.int64}


def _check(batch: dict) -> None:
    unknown = sorted(set(batch) - set(BATCH_KEYS))
    assert not unknown, f'keys missing from diffusion.data.batch.BATCH_KEYS: {unknown}'
    for key, value in batch.items():
        expected = BATCH_KEYS[key].dtype
        if expected in DTYPES:
            assert isinstance(value, torch.Tensor) and value.dtype == DTYPES[expected], key
        else:
            assert isinstance(value, list) and all(isinstance(v, str) for v in value), key


def test_image_caption_batches_hold_only_contract_keys_with_their_dtypes(synthetic_dataset):
    model = build_tiny_sd()
    loader = build_image_caption_dataloader(
        synthetic_dataset,
        batch_size=4,
        resolution=16,
        tokenizer=model.conditioner.tokenizer,
        micro_conditioning=True,
        shuffle=False,
    )
    batch = next(iter(loader))
    _check(batch)
    assert {'image', 'captions', 'input_ids', 'sample_index', 'replaced', *MICRO_CONDITIONING_KEYS} <= set(batch)
    assert batch['image'].shape == (4, 3, 16, 16) and batch['input_ids'].shape == (4, 77)


def test_components_read_and_precompute_writes_contract_keys():
    for model in (build_tiny_sd(), build_tiny_sdxl()):
        conditioner = model.conditioner
        assert set(conditioner.embedding_columns) <= set(BATCH_KEYS)
        assert set(conditioner.extra_columns) <= set(BATCH_KEYS)
        assert set(conditioner.tokenize(['a cat'])) <= set(BATCH_KEYS)
    assert set(LATENT_COLUMNS) <= set(BATCH_KEYS) and set(IMAGE_LATENT_KEYS) <= set(LATENT_COLUMNS)


def test_the_contract_renders_as_a_table_naming_every_key():
    table = describe_batch_keys()
    assert all(f'`{key}`' in table for key in BATCH_KEYS)
    assert table.count('\n') == len(BATCH_KEYS) + 1
