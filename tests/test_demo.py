"""`make demo`'s two training steps as it runs them (``python train.py``, one process) on the real yamls, at a few
batches each."""

import json
import os
import re

import pytest
from PIL import Image

from tests.conftest import run_composer


@pytest.mark.slow
def test_demo_pipeline_runs_end_to_end(synthetic_dataset, tmp_path):
    ae_folder, sd_folder = tmp_path / 'ae', tmp_path / 'sd'
    run_composer(
        'yamls/demo_autoencoder.yaml',
        f'train_dataloader.remote={synthetic_dataset}',
        'max_duration=4ba',
        f'run_folder={ae_folder}',
        'progress_bar=false',
        launcher=False,
    )
    vae_config = json.loads((ae_folder / 'pretrained' / 'vae' / 'config.json').read_text())
    assert vae_config['scaling_factor'] != 1.0  # calibrated from the latent statistics

    out = run_composer(
        'yamls/demo.yaml',
        f'model.pretrained_model_name_or_path={ae_folder}/pretrained',
        f'train_dataloader.remote={synthetic_dataset}',
        f'eval_dataloader.remote={synthetic_dataset}',
        'eval_dataloader.batch_size=32',
        'max_duration=4ba',
        'eval_interval=4ba',
        'save_interval=4ba',
        f'run_folder={sd_folder}',
        'progress_bar=false',
        'callbacks.log_diffusion_images.interval=2ba',
        'callbacks.log_diffusion_images.num_inference_steps=2',
        'callbacks.prompt_following.seeds=[0]',
        'callbacks.prompt_following.num_inference_steps=2',
        launcher=False,
    )
    score = re.search(r'^prompt_following_color: (\d\.\d\d)$', out, re.MULTILINE)
    assert score, out[-2000:]
    results = json.loads((sd_folder / 'demo_results.json').read_text())
    assert round(results['color'], 2) == float(score.group(1))
    assert results['batch'] == 4 and results['num_images'] == 24
    with Image.open(sd_folder / 'samples.png') as grid:
        assert grid.size == (6 * 32 + 7 * 2, 4 * 32 + 5 * 2)  # 24 images, 6 per row (demo.yaml)
    assert sorted(os.listdir(sd_folder / 'samples')) == ['batch_0000002.png', 'batch_0000004.png']
    assert (sd_folder / 'checkpoints' / 'ep0-ba4-rank0.pt').exists()
    log = (sd_folder / 'log.txt').read_text()
    assert 'metrics/eval/MeanSquaredError' in log and 'prompt_following/color' in log


@pytest.mark.slow
def test_demo_mmdit_starts_on_the_demo_autoencoder_and_prints_the_colour_score(synthetic_dataset, tmp_path):
    ae_folder, mmdit_folder = tmp_path / 'ae', tmp_path / 'mmdit'
    run_composer(
        'yamls/demo_autoencoder.yaml',
        f'train_dataloader.remote={synthetic_dataset}',
        'max_duration=2ba',
        f'run_folder={ae_folder}',
        'progress_bar=false',
    )
    out = run_composer(
        'yamls/demo_mmdit.yaml',
        f'model.pretrained_model_name_or_path={ae_folder}/pretrained',
        f'train_dataloader.remote={synthetic_dataset}',
        f'eval_dataloader.remote={synthetic_dataset}',
        'eval_dataloader.batch_size=32',
        'max_duration=3ba',
        'eval_interval=3ba',
        'save_interval=3ba',
        f'run_folder={mmdit_folder}',
        'progress_bar=false',
        'callbacks.log_diffusion_images.interval=3ba',
        'callbacks.log_diffusion_images.num_inference_steps=2',
        'callbacks.prompt_following.seeds=[0]',
        'callbacks.prompt_following.num_inference_steps=2',
    )
    score = re.search(r'^prompt_following_color: (\d\.\d\d)$', out, re.MULTILINE)
    assert score, out[-2000:]
    results = json.loads((mmdit_folder / 'demo_results.json').read_text())
    assert round(results['color'], 2) == float(score.group(1)) and results['batch'] == 3
    with Image.open(mmdit_folder / 'samples.png') as grid:
        assert grid.size == (6 * 32 + 7 * 2, 4 * 32 + 5 * 2)
    log = (mmdit_folder / 'log.txt').read_text()
    assert 'metrics/eval/MeanSquaredError' in log and 'prompt_following/color' in log
