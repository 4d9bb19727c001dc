import json
import os
import re

import torch
from diffusers import AutoencoderKL
from PIL import Image

from diffusion.builders import build_trainer
from diffusion.callbacks import PromptFollowing
from diffusion.evaluation.prompt_following import load_prompts
from tests.conftest import build_tiny_sd, tiny_config


def test_log_diffusion_images_writes_png_grids_and_tensorboard_images(synthetic_dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    callbacks = (
        '+callbacks.log_diffusion_images={prompts:[a red circle,a blue square,a green triangle],interval:1ba,'
        f'folder:{tmp_path}/samples,num_inference_steps:2,guidance_scale:2.0}}'
    )
    trainer = build_trainer(
        tiny_config(
            synthetic_dataset,
            str(tmp_path),
            'max_duration=2ba',
            'save_folder=null',
            callbacks,
            f'+loggers.tensorboard={{log_dir:{tmp_path}/tb}}',
        )
    )
    trainer.fit()
    grids = sorted(os.listdir(tmp_path / 'samples'))
    assert grids == ['batch_0000001.png', 'batch_0000002.png']  # fit end (batch 2) is not written twice
    with Image.open(tmp_path / 'samples' / grids[0]) as grid:
        assert grid.size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)  # 3 images of 16px in a 2x2 grid, 2px padding
    # Composer's TensorBoard logger writes under <log_dir>/<run_name>/, a new event file at each flush.
    images = []
    for event_file in (tmp_path / 'tb' / 'tiny_sd_cpu').iterdir():
        events = EventAccumulator(str(event_file), size_guidance={'images': 0})
        events.Reload()
        images += [(tag, e.step) for tag in events.Tags()['images'] for e in events.Images(tag)]
    assert sorted(step for tag, step in images if tag == 'samples') == [1, 2], images  # one summary per log


def test_samples_are_prompt_major_with_every_seed_of_a_prompt_adjacent():
    callback = PromptFollowing(seeds=(0, 1), num_inference_steps=2, batch_size=10)
    model = build_tiny_sd()
    images, prompts = callback.sample(model)
    assert prompts[:4] == [callback.prompts[0]] * 2 + [callback.prompts[1]] * 2
    # Image 2k + s is prompt k with seed s: regenerate prompt 13 with seed 1 in its original batch position.
    expected = model.generate(
        callback.prompts[10:20], seed=1 * 100_003 + 10, num_inference_steps=2, guidance_scale=5.0
    )[3]
    torch.testing.assert_close(images[2 * 13 + 1], expected)


def test_untrained_model_scores_near_chance():
    # 8 colours: chance is 1/8. A random model's images carry no colour that follows the prompt.
    callback = PromptFollowing(seeds=(0,), num_inference_steps=5, guidance_scale=3.0)
    images, prompts = callback.sample(build_tiny_sd())
    assert images.shape == (24, 3, 16, 16)
    from diffusion.evaluation.prompt_following import score_prompt_following

    result = score_prompt_following(images, prompts)
    assert result['color'] <= 0.3


def _prompt_following_trainer(data, folder, batches: int, extra: str = ''):
    """A tiny run of ``batches`` steps with the prompt-following callback (one seed, 2 sampler steps) into ``folder``;
    ``extra`` adds callback keys (``',interval:1ba'``)."""
    return build_trainer(
        tiny_config(
            data,
            str(folder),
            f'max_duration={batches}ba',
            'save_folder=null',
            f'+callbacks.prompt_following={{folder:{folder},seeds:[0],num_inference_steps:2{extra}}}',
        )
    )


def test_prompt_following_writes_report_grid_and_prints_score(synthetic_dataset, tmp_path, capsys):
    trainer = _prompt_following_trainer(synthetic_dataset, tmp_path, 1)
    trainer.fit()
    report = json.loads((tmp_path / 'demo_results.json').read_text())
    assert report['num_images'] == len(load_prompts()) == 24
    assert 0.0 <= report['color'] <= 1.0 and len(report['per_image']) == 24
    printed = re.search(r'^prompt_following_color: (\d\.\d\d)$', capsys.readouterr().out, re.MULTILINE)
    assert printed and float(printed.group(1)) == round(report['color'], 2)
    with Image.open(tmp_path / 'samples.png') as grid:
        assert grid.size == (5 * 16 + 6 * 2, 5 * 16 + 6 * 2)  # 24 images in rows of ceil(sqrt(24)) = 5


def test_prompt_following_at_an_interval_ending_the_run_samples_once(synthetic_dataset, tmp_path, capsys):
    # The interval's last evaluation falls on the final batch: fit end reuses it instead of sampling the same
    # weights a second time (it wrote the score twice before), and still writes the final grid and report.
    trainer = _prompt_following_trainer(synthetic_dataset, tmp_path, 2, ',interval:1ba')
    callback = next(c for c in trainer.state.callbacks if isinstance(c, PromptFollowing))
    sampled = []
    sample = callback.sample
    callback.sample = lambda model: sampled.append(1) or sample(model)
    trainer.fit()
    assert len(sampled) == 2  # batches 1 and 2; not again at fit end
    # The score lines of batches 1 and 2, then the run's final score line again (what the demo's output ends on).
    assert len(re.findall(r'^prompt_following_color: ', capsys.readouterr().out, re.MULTILINE)) == 3
    assert json.loads((tmp_path / 'demo_results.json').read_text())['batch'] == 2
    assert (tmp_path / 'samples.png').exists() and (tmp_path / 'samples_batch_0000001.png').exists()


def test_save_pretrained_exports_a_loadable_vae_with_calibrated_scale(synthetic_dataset, tmp_path):
    from diffusion.config import validate_config

    cfg = validate_config(
        {
            'model': {
                'name': 'tiny_autoencoder',
                'vae_config': {
                    'block_out_channels': [8, 16],
                    'norm_num_groups': 4,
                    'down_block_types': ['DownEncoderBlock2D'] * 2,
                    'up_block_types': ['UpDecoderBlock2D'] * 2,
                },
            },
            'train_dataloader': {
                'name': 'image_caption',
                'remote': synthetic_dataset,
                'batch_size': 8,
                'resolution': 16,
            },
            'max_duration': '3ba',
            'progress_bar': False,
            'callbacks': {'save_pretrained': {'folder': str(tmp_path / 'pretrained'), 'components': ['vae']}},
        }
    )
    trainer = build_trainer(cfg)
    trainer.fit()
    model = trainer.state.model
    loaded = AutoencoderKL.from_pretrained(tmp_path / 'pretrained' / 'vae')
    assert (tmp_path / 'pretrained' / 'vae' / 'diffusion_pytorch_model.safetensors').exists()
    expected_scale = float(model.latent_var.rsqrt())
    assert abs(loaded.config.scaling_factor - expected_scale) < 1e-6 and expected_scale != 1.0
    for (key, a), (_, b) in zip(model.vae.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), key
