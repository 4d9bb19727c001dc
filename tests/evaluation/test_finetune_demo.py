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


@pytest.mark.slow
def test_finetune_runs_start_from_an_export_and_the_report_tabulates_them(tmp_path, monkeypatch):
    from PIL import Image

    from diffusion.evaluation import finetune_report
    from diffusion.inference.export import export_model
    from tests.conftest import build_tiny_sd, run_composer

    base, data = str(tmp_path / 'base'), str(tmp_path / 'data')
    export_model(build_tiny_sd(), base, model_card=False)  # the test model as `make demo-finetune` exports the demo's
    write_synthetic_dataset(data, 64, seed=3, image_size=16, progress=False, new_color='lime', new_color_fraction=0.5)
    runs = {}
    for method in ('lora', 'full'):
        runs[method] = str(tmp_path / method)
        run_composer(
            f'yamls/demo_finetune_{method}.yaml',
            f'model.pretrained_model_name_or_path={base}',
            f'train_dataloader.remote={data}',
            'train_dataloader.batch_size=8',
            'train_dataloader.resolution=16',
            'max_duration=2ba',
            'save_interval=2ba',
            f'run_folder={runs[method]}',
        )
    monkeypatch.setitem(finetune_report.SAMPLING, 'num_inference_steps', 2)
    out = tmp_path / 'report'
    results = finetune_report.main(
        ['--base', base, '--run', f'lora={runs["lora"]}', '--run', f'full={runs["full"]}', '--out', str(out)]
        + ['--seeds', '0', '1', '2', '--guidance-scale', '2.0']
    )
    written = json.loads((out / 'results.json').read_text())
    assert written['runs'].keys() == {'lora', 'full'}
    assert written['sampling'] == {'seeds': [0, 1, 2], 'guidance_scale': 2.0, 'num_inference_steps': 2}
    lora, full = results['runs']['lora'], results['runs']['full']
    assert 0 < lora['trainable_parameters'] < full['trainable_parameters']
    assert 0 < lora['checkpoint_mb'] < full['checkpoint_mb'] / 3  # adapters only against the model and its moments
    assert lora['batch'] == full['batch'] == 2 and lora['minutes'] > 0 and full['minutes'] > 0
    for scores in (results['base'], lora, full):
        assert 0 <= scores['new'] <= 1 and 0 <= scores['old'] <= 1
        assert scores['num_new_images'] == 3 * 12 and scores['num_old_images'] == 3 * 24  # prompts x seeds
    assert set(results['base']['autoencoder_round_trip']) == {'new', 'old'}
    table = (out / 'results.md').read_text()
    assert table.count('\n| lora | ') == 1 and table.count('\n| full | ') == 1
    with Image.open(out / 'samples.png') as grid:  # per model a row of lime and a row of old colours, 16 px images
        assert grid.size == (8 * 16 + 9 * 2, 6 * 16 + 7 * 2)
