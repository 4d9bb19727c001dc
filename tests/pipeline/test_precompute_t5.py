"""Precomputed T5 conditioning (t5 and sd3 conditioners): T5 states stored trimmed to each caption's tokens in fp16 or
bf16, padded back when read, give the conditioning computed online; shards of another T5 length or encoder are
refused before training, in one line naming the key."""

from __future__ import annotations

import json
import os

import pytest
import torch
from streaming.base.format import reader_from_json
from torch.utils.data import default_collate

from diffusion.builders import build_model, build_trainer
from diffusion.config import load_config
from diffusion.data.latents import StreamingLatentDataset
from diffusion.pipeline.__main__ import main
from diffusion.utils import ConfigError
from tests.conftest import REPO_ROOT
from tests.models.test_mmdit import MMDIT_YAML, TEST_SD3_VAE_OVERRIDE

LATENTS_YAML = os.path.join(REPO_ROOT, 'yamls', 'tiny_mmdit_latents_cpu.yaml')
# Test size, shared by precompute and the runs that read its shards (the encoders are seeded alike only then).
MMDIT_OVERRIDES = [TEST_SD3_VAE_OVERRIDE, 'model.max_length=16']


def precompute_mmdit(data: str, out: str, *extra: str, overrides=MMDIT_OVERRIDES) -> None:
    main(['precompute', '--input', data, '--out', out, '--config', MMDIT_YAML, '--resolution', '16', '--batch-size',
          '16', '--no-progress', *extra, '--override', *overrides])  # fmt: skip


def seeded_model(overrides=MMDIT_OVERRIDES):
    from composer.utils import reproducibility

    cfg = load_config(MMDIT_YAML, list(overrides))
    reproducibility.seed_all(cfg.seed)
    return build_model(cfg.model).eval()


def first_rows(folder: str, n: int) -> list[dict]:
    with open(os.path.join(folder, 'index.json')) as f:
        shard = json.load(f)['shards'][0]
    reader = reader_from_json(folder, None, shard)
    return [reader.get_item(i) for i in range(n)]


@pytest.mark.parametrize('dtype, tolerance', [('float16', 2e-3), ('bfloat16', 2e-2)])
def test_precomputed_t5_conditioning_is_the_online_conditioning(dtype, tolerance, synthetic_dataset, tmp_path):
    out = str(tmp_path / 'latents')
    precompute_mmdit(synthetic_dataset, out, '--latents-dtype', dtype)
    model = seeded_model()
    t5_tokenizer = model.conditioner._get('tokenizer_3')

    # Stored trimmed: each row holds its caption's T5 tokens only (the captions are shorter than 16 tokens).
    rows = first_rows(out, 8)
    lengths = [len(t5_tokenizer(r['caption'])['input_ids']) for r in rows]
    assert [r['t5_embeds'].shape for r in rows] == [(min(n, 16), 48) for n in lengths]
    assert min(lengths) < 16 and {r['t5_max_length'] for r in rows} == {16}
    assert rows[0]['clip_embeds'].shape == (77, 32)  # CLIP-L + CLIP-G at their own width, not T5's

    dataset = StreamingLatentDataset(local=out)
    batch = default_collate([dataset[i] for i in range(8)])
    assert batch['t5_embeds'].shape == (8, 16, 48) and batch['t5_attention_mask'].sum(1).tolist() == [
        min(n, 16) for n in lengths
    ]
    with torch.no_grad():
        stored = model.conditioner.conditioning(batch, False, (16, 16))
        online = model.conditioner.conditioning({'captions': batch['captions']}, False, (16, 16))
    assert stored.keys() == online.keys() == {'text_embeds', 'pooled_text_embeds'}
    for key in online:
        assert stored[key].shape == online[key].shape
        scale = float(online[key].abs().max())
        assert float((stored[key] - online[key]).abs().max()) <= tolerance * scale, key
    # The padding is exactly the masked T5's zeros, online and read back.
    padded = batch['t5_attention_mask'] == 0
    assert padded.any() and float(online['text_embeds'][:, 77:][padded].abs().max()) == 0.0
    assert float(stored['text_embeds'][:, 77:][padded].abs().max()) == 0.0

    # Training steps from the precomputed shards (the same yaml, on latents) start and log a finite loss.
    cfg = load_config(
        LATENTS_YAML,
        [*MMDIT_OVERRIDES, f'train_dataloader.remote={out}', 'train_dataloader.batch_size=4',
         f'run_folder={tmp_path}/run', 'save_folder=null', 'max_duration=2ba', 'progress_bar=false'],
    )  # fmt: skip
    trainer = build_trainer(cfg)
    trainer.fit()
    assert trainer.state.timestamp.batch.value == 2 and torch.isfinite(trainer.state.loss).all()


def test_t5_embeddings_of_another_length_or_encoder_are_refused_before_training(synthetic_dataset, tmp_path):
    out = str(tmp_path / 'latents')
    precompute_mmdit(synthetic_dataset, out)
    common = [f'train_dataloader.remote={out}', f'run_folder={tmp_path}/run', 'save_folder=null']
    with pytest.raises(ConfigError, match=r'^Invalid model\.max_length=24: train_dataloader\.remote holds T5 '
                                          r'embeddings precomputed for 16 tokens') as error:  # fmt: skip
        build_trainer(load_config(LATENTS_YAML, [TEST_SD3_VAE_OVERRIDE, 'model.max_length=24', *common]))
    assert '\n' not in str(error.value)
    # Another seed builds another random T5: same shape, other weights.
    with pytest.raises(ConfigError, match=r'^Invalid train_dataloader\.remote: its T5 embeddings were precomputed '
                                          r"with the encoder 'built d_model=48 layers=2 sha256:") as error:  # fmt: skip
        build_trainer(load_config(LATENTS_YAML, [*MMDIT_OVERRIDES, 'seed=18', *common]))
    assert '\n' not in str(error.value)
    build_trainer(load_config(LATENTS_YAML, [*MMDIT_OVERRIDES, *common]))  # the matching model builds
