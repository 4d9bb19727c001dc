"""Plumbing of the BLIP-2 captioner on a tiny random-weight model saved to disk (no hub access)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from sklearn.datasets import load_sample_images

from diffusion.pipeline.captioners import Blip2Captioner, Captioner, build_captioner, captioners, save_tiny_blip2


@pytest.fixture(scope='module')
def tiny_blip2(tmp_path_factory) -> str:
    return save_tiny_blip2(str(tmp_path_factory.mktemp('tiny_blip2')))


@pytest.fixture(scope='module')
def images() -> list[Image.Image]:
    photos = [Image.fromarray(a) for a in load_sample_images().images]  # two real 427x640 photos
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 90, 3), dtype=np.uint8))
    gray = Image.new('L', (20, 30), 200)
    rgba = Image.new('RGBA', (64, 16), (0, 0, 255, 100))
    return [photos[0], gray, noise, rgba, photos[1]]


def test_captions_one_per_image_in_order(tiny_blip2, images):
    captioner = Blip2Captioner(tiny_blip2, batch_size=2)
    captions = captioner.caption(images)
    assert isinstance(captioner, Captioner)
    assert captioner.name == f'blip2:{tiny_blip2}'
    assert len(captions) == len(images)
    assert all(isinstance(c, str) and c and c == c.strip() for c in captions)
    # Each image captioned alone gives the caption at its position in the batched run.
    assert [captioner.caption([im])[0] for im in images] == captions
    assert len(set(captions)) > 1, 'captions of the tiny model should depend on the image'
    assert captioner.caption([]) == []


def test_deterministic_across_instances_and_batch_sizes(tiny_blip2, images):
    first = Blip2Captioner(tiny_blip2, batch_size=1, max_new_tokens=8).caption(images)
    second = Blip2Captioner(tiny_blip2, batch_size=3, max_new_tokens=8).caption(images)
    assert first == second


def test_caption_leaves_global_rng_alone(tiny_blip2, images):
    captioner = Blip2Captioner(tiny_blip2, seed=123, max_new_tokens=8)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    captioner.caption(images[:2])
    assert torch.equal(torch.rand(3), expected)


def test_max_new_tokens_bounds_length(tiny_blip2, images):
    captioner = Blip2Captioner(tiny_blip2, max_new_tokens=3)
    tokenizer = captioner.processor.tokenizer
    lengths = [len(tokenizer(c, add_special_tokens=False).input_ids) for c in captioner.caption(images)]
    assert all(n <= 3 for n in lengths)
    assert max(lengths) == 3


def test_prompt_is_used_but_not_returned(tiny_blip2, images):
    prompt = 'a photo of'
    plain = Blip2Captioner(tiny_blip2, max_new_tokens=8).caption(images)
    prompted = Blip2Captioner(tiny_blip2, prompt=prompt, batch_size=5, max_new_tokens=8).caption(images)
    assert len(prompted) == len(images)
    assert not any(c.startswith(prompt) for c in prompted)
    assert prompted != plain
    assert Blip2Captioner(tiny_blip2, prompt=prompt, batch_size=1, max_new_tokens=8).caption(images) == prompted


def test_beam_search_runs(tiny_blip2, images):
    captions = Blip2Captioner(tiny_blip2, num_beams=2, batch_size=2, max_new_tokens=8).caption(images)
    assert len(captions) == len(images) and all(isinstance(c, str) for c in captions)


def test_bad_dtype(tiny_blip2):
    with pytest.raises(ValueError, match='float64'):
        Blip2Captioner(tiny_blip2, dtype='float64')


@pytest.mark.parametrize('dtype', ['float16', 'bfloat16'])
def test_half_precision(tiny_blip2, images, dtype):
    captioner = Blip2Captioner(tiny_blip2, dtype=dtype, max_new_tokens=8)
    assert captioner.model.language_model.dtype == getattr(torch, dtype)
    # transformers keeps BLIP-2's Q-Former in float32 under float16 only (`_keep_in_fp32_modules`).
    qformer_dtype = torch.float32 if dtype == 'float16' else torch.bfloat16
    assert next(captioner.model.qformer.parameters()).dtype == qformer_dtype
    assert len(captioner.caption(images[:2])) == 2


def test_registry_and_build_captioner(tiny_blip2):
    assert 'blip2' in captioners.names()
    captioner = build_captioner('blip2', model_name_or_path=tiny_blip2, batch_size=4)
    assert isinstance(captioner, Blip2Captioner) and captioner.batch_size == 4
    with pytest.raises(ValueError, match='blip2'):
        build_captioner('git-large')
    with pytest.raises(ValueError, match='max_new_tokens'):
        build_captioner('blip2', model_name_or_path=tiny_blip2, max_tokens=5)


def test_missing_path_names_it(tmp_path):
    missing = str(tmp_path / 'no_such_model')
    with pytest.raises(FileNotFoundError, match='no_such_model'):
        Blip2Captioner(missing)


def test_save_tiny_blip2_is_seeded(tmp_path):
    def weights(seed: int, name: str) -> dict[str, torch.Tensor]:
        return load_file(os.path.join(save_tiny_blip2(str(tmp_path / name), seed=seed), 'model.safetensors'))

    a, b, c = weights(0, 'a'), weights(0, 'b'), weights(1, 'c')
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
