"""Precomputed latents: stored unscaled, scaled once by the model, same loss as training from images."""

from __future__ import annotations

import json
import os

import pytest
import torch
from streaming.base.format import reader_from_json
from torch.utils.data import default_collate

from diffusion.builders import build_model, build_trainer
from diffusion.config import load_config
from diffusion.data.image_caption import StreamingImageCaptionDataset
from diffusion.data.latents import StreamingLatentDataset, from_stored, to_stored
from diffusion.pipeline.__main__ import main
from tests.conftest import TEST_MODEL_OVERRIDES, TINY_YAML, tiny_config
from tests.pipeline.test_distributed import pipeline_command, run

# A scaling factor that is not 1, so that scaling twice (or never) changes the loss.
OVERRIDES = [*TEST_MODEL_OVERRIDES, '+model.vae_config.scaling_factor=0.5', 'model.caption_drop_prob=0.5']


def precompute(data: str, out: str, *extra: str) -> None:
    main(['precompute', '--input', data, '--out', out, '--config', TINY_YAML, '--resolution', '16', '--batch-size',
          '16', '--no-progress', *extra, '--override', *OVERRIDES])  # fmt: skip


def seeded_model():
    """The model the yaml builds, seeded as training (and precompute) seed it."""
    from composer.utils import reproducibility

    cfg = load_config(TINY_YAML, OVERRIDES)
    reproducibility.seed_all(cfg.seed)
    return build_model(cfg.model)


def batches(data: str, latents: str, model, indices: list[int]) -> tuple[dict, dict]:
    images = StreamingImageCaptionDataset(local=data, tokenizer=model.tokenizer, resolution=16, crop='center')
    stored = StreamingLatentDataset(local=latents)
    return default_collate([images[i] for i in indices]), default_collate([stored[i] for i in indices])


def test_training_from_latents_gives_the_loss_of_training_from_images(synthetic_dataset, tmp_path):
    latents = str(tmp_path / 'latents')
    precompute(synthetic_dataset, latents, '--latents-dtype', 'float32')
    model = seeded_model()
    image_batch, latent_batch = batches(synthetic_dataset, latents, model, [0, 1, 2, 3, 50, 127])
    assert latent_batch['captions'] == image_batch['captions']
    # Stored moments are the VAE's own, unscaled: the model applies the scaling factor.
    mean, std = model.vae_moments(image_batch['image'])
    torch.testing.assert_close(latent_batch['image_latents_mean'], mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(latent_batch['image_latents_std'], std, rtol=1e-5, atol=1e-5)

    model.train()  # caption dropout (p=0.5) is on, drawn identically in both paths
    losses = []
    for batch in (image_batch, latent_batch):
        torch.manual_seed(123)
        losses.append(model.loss(model(batch), batch))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    torch.manual_seed(124)
    assert not torch.allclose(model.loss(model(latent_batch), latent_batch), losses[1])  # the draw matters

    # fp16 storage stays close; bf16 too, further off.
    for dtype, tolerance in (('float16', 2e-3), ('bfloat16', 2e-2)):
        out = str(tmp_path / dtype)
        precompute(synthetic_dataset, out, '--latents-dtype', dtype)
        _, low = batches(synthetic_dataset, out, model, [0, 1, 2, 3, 50, 127])
        torch.manual_seed(123)
        assert abs(float(model.loss(model(low), low)) - float(losses[0])) <= tolerance * float(losses[0])


def test_a_stored_sample_is_reproducible_and_carries_provenance(synthetic_dataset, tmp_path):
    first, second = str(tmp_path / 'a'), str(tmp_path / 'b')
    precompute(synthetic_dataset, first, '--store', 'sample', '--seed', '3')
    precompute(synthetic_dataset, second, '--store', 'sample', '--seed', '3')
    a, b = StreamingLatentDataset(local=first), StreamingLatentDataset(local=second)
    assert set(a[0]) == {'image_latents', 'text_embeds', 'captions', 'sample_index', 'replaced'}
    assert torch.equal(a[5]['image_latents'], b[5]['image_latents'])
    with open(os.path.join(first, 'index.json')) as f:
        shard = json.load(f)['shards'][0]
    row = reader_from_json(first, None, shard).get_item(0)
    assert {'license', 'attribution', 'source_url', 'caption'} <= set(row) and 'image' not in row


def test_storage_dtypes_round_trip():
    tensor = torch.randn(4, 8, 8)
    assert torch.equal(from_stored(to_stored(tensor, 'float32'), 'float32'), tensor)
    torch.testing.assert_close(from_stored(to_stored(tensor, 'bfloat16'), 'bfloat16'), tensor, rtol=1e-2, atol=1e-2)
    assert to_stored(tensor, 'bfloat16').dtype.name == 'int16'  # numpy has no bf16: the bits travel as int16
    with pytest.raises(ValueError, match="Unknown latent storage dtype 'float8'"):
        to_stored(tensor, 'float8')
    # Read back as torch itself converts each storage dtype, bit for bit, NaN, infinities and -0 included.
    special = torch.cat([torch.tensor([float('nan'), float('inf'), -float('inf'), -0.0, 1e-40]), tensor.flatten()])
    for dtype, torch_dtype in (('float32', torch.float32), ('float16', torch.float16), ('bfloat16', torch.bfloat16)):
        stored = to_stored(special, dtype)
        stored.flags.writeable = False  # as shard memory is
        read = from_stored(stored, dtype)
        expected = special.to(torch_dtype).float()
        assert read.dtype == torch.float32 and torch.equal(read.view(torch.int32), expected.view(torch.int32))
        read[0] = 0.0  # a copy that can be written


def test_a_run_on_latents_never_calls_the_encoders(synthetic_dataset, tmp_path):
    latents = str(tmp_path / 'latents')
    precompute(synthetic_dataset, latents)
    cfg = tiny_config(
        latents, str(tmp_path / 'run'), 'train_dataloader.name=latents', '~train_dataloader.resolution',
        '~train_dataloader.crop', 'model.caption_drop_prob=0.5', 'max_duration=3ba', 'save_folder=null',
    )  # fmt: skip
    trainer = build_trainer(cfg)
    model = trainer.state.model

    def fail(*args, **kwargs):
        raise AssertionError('an encoder ran on a batch of precomputed latents')

    model.vae.encode = fail
    empty = model.conditioner.text_embeddings([''])['text_embeds']  # the one text-encoder call, made before the run
    model.conditioner._empty_text_embeds = empty
    model.text_encoder.forward = fail
    trainer.fit()
    assert trainer.state.timestamp.batch.value == 3


def test_precompute_rejects_inputs_without_images(tmp_path):
    with pytest.raises(FileNotFoundError, match='Input dataset folder'):
        precompute(str(tmp_path / 'missing'), str(tmp_path / 'out'))


@pytest.mark.slow
@pytest.mark.world_size(2)
def test_two_ranks_precompute_what_one_does(synthetic_dataset, tmp_path):
    one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
    precompute(synthetic_dataset, one, '--store', 'sample', '--size-limit', '8kb')
    run(pipeline_command('precompute', '--input', synthetic_dataset, '--out', two, '--config', TINY_YAML,
                         '--resolution', '16', '--batch-size', '16', '--store', 'sample', '--size-limit', '8kb',
                         '--override', *OVERRIDES, processes=2))  # fmt: skip
    a, b = StreamingLatentDataset(local=one), StreamingLatentDataset(local=two)
    assert len(a) == len(b) == 128
    for index in (0, 31, 64, 127):
        assert torch.equal(a[index]['image_latents'], b[index]['image_latents'])
        assert torch.equal(a[index]['text_embeds'], b[index]['text_embeds'])


def test_sdxl_latents_store_both_encoders_pooled_and_size_conditioning(synthetic_dataset, tmp_path):
    """SDXL precompute: context of both encoders, pooled embedding and the center crop's micro-conditioning, and
    training from them gives the loss of training from the images with the same conditioning."""
    from composer.utils import reproducibility

    from diffusion.data.image_caption import decode_image, resize_and_crop
    from tests.conftest import TEST_XL_MODEL_OVERRIDES, TINY_XL_YAML

    out = str(tmp_path / 'xl')
    main(['precompute', '--input', synthetic_dataset, '--out', out, '--config', TINY_XL_YAML, '--resolution', '16',
          '--batch-size', '16', '--no-progress', '--latents-dtype', 'float32',
          '--override', *TEST_XL_MODEL_OVERRIDES])  # fmt: skip
    stored = StreamingLatentDataset(local=out)
    sample = stored[3]
    assert sample['text_embeds'].shape == (77, 32) and sample['pooled_text_embeds'].shape == (16,)
    images = StreamingImageCaptionDataset(local=synthetic_dataset, resolution=16, crop='center')
    raw = images.get_item(3)
    decoded = decode_image(raw['image'])
    # The synthetic images are squares with no original-size columns: original = decoded size, crop at 0, 0.
    assert sample['cond_original_size'].tolist() == [decoded.height, decoded.width] and decoded.height > 16
    assert sample['cond_crops_coords_top_left'].tolist() == [0, 0]
    assert sample['cond_target_size'].tolist() == [16, 16]

    cfg = load_config(TINY_XL_YAML, TEST_XL_MODEL_OVERRIDES)
    reproducibility.seed_all(cfg.seed)
    model = build_model(cfg.model).eval()
    pixels, top_left = resize_and_crop(decoded, 16, 16, 'center')
    image_batch = {
        'image': pixels[None],
        'captions': [raw['caption']],
        'cond_original_size': torch.tensor([[decoded.height, decoded.width]]),
        'cond_crops_coords_top_left': torch.tensor([top_left]),
        'cond_target_size': torch.tensor([[16, 16]]),
    }
    latent_batch = default_collate([sample])
    with torch.no_grad():
        from_images, from_latents = model.eval_forward(image_batch)[0], model.eval_forward(latent_batch)[0]
    torch.testing.assert_close(from_images, from_latents, rtol=1e-5, atol=1e-5)


class RecordingBar:
    """Stands in for tqdm in the stage runner: records the bar's total, unit and progress."""

    bars: list = []

    def __init__(self, total=None, unit='it', **kwargs):
        self.total, self.unit, self.n, self.updates = total, unit, 0, 0
        RecordingBar.bars.append(self)

    def update(self, n=1):
        self.n += n
        self.updates += 1

    def close(self):
        pass


def test_the_progress_bar_counts_samples_not_units(synthetic_dataset, tmp_path, monkeypatch):
    # It counted units (shards): with one shard per rank it sat at 0% until the end (111 s for the demo's data).
    monkeypatch.setattr('diffusion.pipeline.runner.tqdm', RecordingBar)
    RecordingBar.bars = []
    precompute(synthetic_dataset, str(tmp_path / 'latents'))
    (bar,) = RecordingBar.bars
    assert (bar.unit, bar.total, bar.n) == ('sample', 128, 128)
    assert bar.updates > 1  # it moves during a unit, not once at its end
