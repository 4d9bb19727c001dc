"""ImageMetrics: in-training FID/KID/CLIP score equal to the standalone command's and the same on 1 or 2 ranks."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.callbacks.image_metrics import ImageMetrics
from diffusion.evaluation.image_metrics import load_image, to_uint8
from diffusion.evaluation.metrics import main
from diffusion.evaluation.prompts import load_prompt_set
from tests.callbacks.image_metrics_worker import SETTINGS, evaluate_tiny
from tests.conftest import REPO_ROOT, build_tiny_sd, run_script
from tests.evaluation.test_metrics import extract, numpy_fid, random_images, save_extractor, save_tiny_clip, write_pngs

METRIC_KEYS = ('fid', 'kid_mean', 'kid_std', 'clip_score', 'num_images')


@pytest.fixture(scope='module')
def assets(tmp_path_factory):
    """7 reference PNGs at 32px (uneven over two ranks), the TorchScript tiny extractor and a tiny CLIP."""
    root = tmp_path_factory.mktemp('image_metrics')
    write_pngs(root / 'reference', random_images(7, seed=9), [f'r{i}.png' for i in range(7)])
    return dict(
        reference=str(root / 'reference'),
        extractor=save_extractor(root / 'extractor.pt'),
        clip=save_tiny_clip(root / 'clip'),
    )


def standalone(assets: dict, folder: str) -> dict:
    """The command on a saved folder, with the callback's extractors and KID settings."""
    return main(
        ['--images', folder, '--reference', assets['reference'], '--fid', '--kid', '--clip-score']
        + ['--feature-extractor', assets['extractor'], '--clip-model', assets['clip'], '--resolution', '32']
        + ['--kid-subsets', str(SETTINGS['kid_subsets']), '--kid-subset-size', str(SETTINGS['kid_subset_size'])]
    )


def read_folder(folder: str) -> dict[str, np.ndarray]:
    return {
        name: np.asarray(Image.open(os.path.join(folder, name)))
        for name in sorted(os.listdir(folder))
        if name.endswith('.png')
    }


def test_logged_metrics_equal_the_standalone_command_on_the_saved_images(assets, tmp_path):
    result, logged, _ = evaluate_tiny(assets, str(tmp_path / 'saved'))
    assert logged == {f'metrics/{name}': result[name] for name in METRIC_KEYS}
    assert result['num_images'] == 5 and result['num_reference'] == 7
    assert result['fid'] > 0 and result['clip_score'] > 0
    folder = tmp_path / 'saved' / 'batch_0000000'
    prompts = load_prompt_set('demo', limit=5)
    rows = [json.loads(line) for line in (folder / 'samples.jsonl').read_text().splitlines()]
    assert [(r['file'], r['prompt_index'], r['prompt'], r['seed']) for r in rows] == [
        (f'{i:05d}_{11 + i}.png', i, prompts[i], 11 + i) for i in range(5)
    ]
    assert json.loads((folder / 'metrics.json').read_text())['fid'] == result['fid']
    # Prompt i is drawn with seed 11 + i, whatever batch it was in.
    torch.manual_seed(0)  # the callback's model, rebuilt
    model = build_tiny_sd()
    alone = model.generate([prompts[3]], seed=[14], num_inference_steps=2, guidance_scale=5.0, height=32, width=32)
    assert torch.equal(to_uint8(alone)[0], load_image(str(folder / '00003_14.png')))

    again = standalone(assets, str(folder))
    for name in ('fid', 'kid_mean', 'kid_std', 'clip_score'):
        assert again[name] == pytest.approx(result[name], rel=1e-6, abs=1e-9), name
    assert (again['num_images'], again['num_reference']) == (5, 7)
    # And FID by hand from the saved PNGs.
    generated = torch.stack([load_image(str(folder / row['file'])) for row in rows])
    reference = torch.stack([load_image(os.path.join(assets['reference'], f'r{i}.png')) for i in range(7)])
    assert result['fid'] == pytest.approx(numpy_fid(extract(reference), extract(generated)), rel=1e-6)


def test_a_second_evaluation_keeps_the_reference_features(assets, tmp_path):
    """Reference features are extracted once and kept for later evaluations: the same weights evaluated again give
    the same FID, KID and CLIP score (KID's reference list used to be emptied by the first reset)."""
    from tests.callbacks.image_metrics_worker import harness

    first, _, callback = evaluate_tiny(assets, str(tmp_path / 'first'))
    assert callback.metrics.kid is not None and first['num_reference'] == 7
    torch.manual_seed(0)  # the same weights as evaluate_tiny's model
    state, logger, _ = harness(build_tiny_sd())
    second = callback.evaluate(state, logger)
    assert second == first


@pytest.mark.slow
@pytest.mark.world_size(2)
def test_two_ranks_give_the_values_and_images_of_one(assets, tmp_path):
    one, _, _ = evaluate_tiny(assets, str(tmp_path / 'one'))
    out = tmp_path / 'two'
    out.mkdir()
    worker = os.path.join(REPO_ROOT, 'tests', 'callbacks', 'image_metrics_worker.py')
    run_script(worker, str(out), assets['reference'], assets['extractor'], assets['clip'], processes=2)
    ranks = [json.loads((out / f'rank{rank}.json').read_text()) for rank in (0, 1)]
    for rank in ranks:
        assert rank['logged'] == {f'metrics/{name}': rank['result'][name] for name in METRIC_KEYS}
        for name in ('fid', 'kid_mean', 'kid_std', 'clip_score'):
            assert rank['result'][name] == pytest.approx(one[name], rel=1e-5, abs=1e-9), name
        assert (rank['result']['num_images'], rank['result']['num_reference']) == (5, 7)
    single, double = read_folder(tmp_path / 'one' / 'batch_0000000'), read_folder(out / 'images' / 'batch_0000000')
    assert sorted(single) == sorted(double) == [f'{i:05d}_{11 + i}.png' for i in range(5)]
    for name in single:
        np.testing.assert_array_equal(single[name], double[name], err_msg=name)
    assert (out / 'images' / 'batch_0000000' / 'samples.jsonl').read_text() == (
        tmp_path / 'one' / 'batch_0000000' / 'samples.jsonl'
    ).read_text()


@pytest.mark.slow
def test_evaluates_at_the_interval_and_once_at_the_end_of_training(assets, synthetic_dataset, tmp_path):
    from composer.loggers import InMemoryLogger

    from diffusion.builders import build_trainer
    from tests.conftest import tiny_config

    trainer = build_trainer(tiny_config(synthetic_dataset, str(tmp_path / 'run'), 'max_duration=3ba'))
    callback = ImageMetrics(
        prompts=['a red circle', 'a blue square', 'a green triangle'],
        reference=assets['reference'],
        metrics=['fid', 'clip_score'],
        feature_extractor=assets['extractor'],
        clip_model=assets['clip'],
        interval='2ba',
        num_inference_steps=1,
        resolution=32,
        save_folder=str(tmp_path / 'metrics'),
    )
    memory = InMemoryLogger()
    trainer.state.callbacks.append(callback)
    trainer.logger.destinations = (*trainer.logger.destinations, memory)
    memory.init(trainer.state, trainer.logger)
    trainer.fit()
    assert sorted(os.listdir(tmp_path / 'metrics')) == ['batch_0000002', 'batch_0000003']
    fids = memory.data['metrics/fid']
    assert [int(timestamp.batch) for timestamp, _ in fids] == [2, 3]
    assert fids[-1][1] == callback.last_result['fid'] and 'metrics/kid_mean' not in memory.data


def test_arguments_are_checked(assets, monkeypatch):
    with pytest.raises(ValueError, match='fid and kid need reference images'):
        ImageMetrics(metrics=['fid'], feature_extractor=assets['extractor'])
    with pytest.raises(ValueError, match='empty list'):
        ImageMetrics(prompts=[], metrics=['clip_score'], clip_model=assets['clip'])
    with pytest.raises(ValueError, match="Unknown or no metrics \\['fdi'\\]"):
        ImageMetrics(metrics=['fdi'], reference=assets['reference'])
    # Every rank needs a prompt and a reference image; checked before any sampling.
    few_prompts = ImageMetrics(
        prompts=['a', 'b', 'c'], reference=assets['reference'], metrics=['fid'], feature_extractor=assets['extractor']
    )
    few_references = ImageMetrics(
        reference=assets['reference'], metrics=['fid'], feature_extractor=assets['extractor'], num_reference=2
    )
    monkeypatch.setattr('composer.utils.dist.get_world_size', lambda: 4)
    with pytest.raises(ValueError, match='3 prompts cannot be shared by 4 ranks'):
        few_prompts.evaluate(None, None)
    with pytest.raises(ValueError, match='2 reference images cannot be shared by 4 ranks'):
        few_references.evaluate(None, None)
