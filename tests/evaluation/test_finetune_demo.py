"""`make demo-finetune`'s pieces: the new colour in the generator and the checker, and the report on tiny runs."""

import hashlib
import json

import numpy as np
import pytest

from diffusion.data.synthetic import NEW_COLORS, PALETTE, render_sample, write_synthetic_dataset
from diffusion.evaluation.prompt_following import (
    FINETUNE_COLORS,
    FINETUNE_PROMPTS_PATH,
    dominant_color,
    load_prompts,
    parse_prompt,
    score_prompt_following,
)


def test_the_default_data_is_what_it_was():
    # The digest of the first 16 default samples as the generator drew them before NEW_COLORS existed.
    digest = hashlib.sha256()
    for index in range(16):
        image, record = render_sample(index, 0, 32)
        digest.update(np.asarray(image).tobytes())
        digest.update(json.dumps(record, sort_keys=True).encode())
    assert digest.hexdigest() == 'b493eab3d13080c6eee2696bb2b6ab78dc7e37949545b064b2fc22c66cc7f045'


def test_new_colour_samples_show_and_name_it_and_the_checker_sees_it():
    images, prompts = [], []
    for index in range(24):
        image, record = render_sample(index, 5, 32, new_color='lime')
        assert record['color'] == 'lime' and ' lime ' in f' {record["caption"]} '
        assert dominant_color(image, FINETUNE_COLORS) == 'lime'
        images.append(image)
        prompts.append(record['caption'])
    assert score_prompt_following(images, prompts, colors=FINETUNE_COLORS)['color'] == 1.0
    # The palette alone knows no lime: its nearest old colour wins, and a lime prompt names no colour.
    assert dominant_color(images[0]) in ('yellow', 'green')
    assert parse_prompt('a large lime circle') == (None, 'circle')
    assert parse_prompt('a large lime circle', FINETUNE_COLORS) == ('lime', 'circle')


def test_old_colour_images_are_not_the_new_concept():
    # The nearest old colours (yellow, green) and the others, rendered by the generator, asked for as lime.
    images = [render_sample(index, 0, 32)[0] for index in range(40)]
    colors = [render_sample(index, 0, 32)[1]['color'] for index in range(40)]
    assert {'yellow', 'green'} <= set(colors)
    lime_prompts = ['a large lime circle on a plain gray background'] * len(images)
    assert score_prompt_following(images, lime_prompts, colors=FINETUNE_COLORS)['color'] == 0.0
    own = [f'a large {color} circle' for color in colors]
    assert score_prompt_following(images, own, colors=FINETUNE_COLORS)['color'] == 1.0


def test_new_colour_fraction_and_bad_values():
    drawn = [render_sample(index, 3, 16, 'lime', 0.5)[1]['color'] for index in range(200)]
    assert 70 < drawn.count('lime') < 130 and set(drawn) - {'lime'} <= set(PALETTE)
    assert {render_sample(index, 3, 16, 'lime', 0.0)[1]['color'] for index in range(50)} <= set(PALETTE)
    with pytest.raises(ValueError, match=r"^new_color 'teal' is not one of NEW_COLORS \(lime\)\.$"):
        render_sample(0, 0, 16, new_color='teal')
    with pytest.raises(ValueError, match=r'^new_color_fraction must be in \[0, 1\], got 1.5\.$'):
        render_sample(0, 0, 16, new_color='lime', new_color_fraction=1.5)
    with pytest.raises(ValueError, match=r"^colors \['teal'\] are not colours of the generator"):
        score_prompt_following([], [], colors=['red', 'teal'])


def test_finetune_prompts_name_the_new_colour_in_every_shape():
    prompts = load_prompts(FINETUNE_PROMPTS_PATH)
    parsed = {parse_prompt(prompt, FINETUNE_COLORS) for prompt in prompts}
    assert {color for color, _ in parsed} == set(NEW_COLORS)
    assert {shape for _, shape in parsed} == {'circle', 'square', 'triangle'}


def test_the_writer_writes_the_new_colour_mix(tmp_path):
    from streaming import StreamingDataset

    out = str(tmp_path / 'ft')
    write_synthetic_dataset(out, 40, seed=2, image_size=16, progress=False, new_color='lime', new_color_fraction=0.5)
    captions = [sample['caption'] for sample in StreamingDataset(local=out, shuffle=False, batch_size=1)]
    expected = [render_sample(index, 2, 16, 'lime', 0.5)[1]['caption'] for index in range(40)]
    assert captions == expected and 0 < sum(' lime ' in c for c in captions) < 40
