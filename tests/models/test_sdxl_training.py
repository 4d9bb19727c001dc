"""yamls/tiny_sdxl_cpu.yaml trains on CPU as users launch it: two processes, buckets, micro-conditioning, EMA."""

from __future__ import annotations

import os
import re

import pytest
import torch

from diffusion.builders import build_trainer
from tests.conftest import REPO_ROOT, TEST_XL_MODEL_OVERRIDES, TINY_XL_YAML, run_composer
from tests.test_train import LossRecorder


def xl_overrides(data: str, run_folder: str, *extra: str) -> list[str]:
    return [
        *TEST_XL_MODEL_OVERRIDES,
        f'train_dataloader.remote={data}',
        'train_dataloader.resolution=16',
        'train_dataloader.aspect_buckets=[[16,16],[16,24],[24,16]]',
        f'run_folder={run_folder}',
        'progress_bar=false',
        'callbacks.log_diffusion_images.num_inference_steps=2',
        *extra,
    ]


@pytest.mark.slow
def test_tiny_sdxl_yaml_trains_with_two_processes(synthetic_dataset, tmp_path):
    run = str(tmp_path / 'run')
    run_composer(
        TINY_XL_YAML,
        *xl_overrides(synthetic_dataset, run, 'max_duration=6ba', 'save_interval=3ba', 'algorithms.ema.ema_start=2ba'),
        processes=2,
    )
    with open(os.path.join(run, 'log.txt')) as f:
        losses = [float(v) for v in re.findall(r'loss/train/total: ([0-9.eE+-]+)', f.read())]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    checkpoints = os.listdir(os.path.join(run, 'checkpoints'))
    assert {'ep0-ba3-rank0.pt', 'ep0-ba6-rank0.pt', 'ep0-ba6-rank0.pt.sha256'} <= set(checkpoints)
    state = torch.load(os.path.join(run, 'checkpoints', 'ep0-ba6-rank0.pt'), weights_only=False)['state']
    unet_keys = [k for k in state['model'] if k.startswith('unet.add_embedding')]
    assert unet_keys, 'the text_time embedding of the SDXL UNet is in the checkpoint'
    assert any(k.startswith('text_encoder_2.') for k in state['model'])
    assert os.path.isfile(os.path.join(run, 'samples', 'batch_0000006.png'))


@pytest.mark.slow
def test_tiny_sdxl_learns_on_synthetic_data(synthetic_dataset, tmp_path):
    from diffusion.config import load_config

    overrides = xl_overrides(
        synthetic_dataset, str(tmp_path), 'max_duration=40ba', 'optimizer.lr=2e-3', 'save_folder=null', '~algorithms'
    )
    overrides = [o for o in overrides if not o.startswith('callbacks.')] + ['~callbacks']
    trainer = build_trainer(load_config(TINY_XL_YAML, overrides))
    recorder = LossRecorder()
    trainer.state.callbacks.append(recorder)
    trainer.fit()
    first, last = recorder.losses[:8], recorder.losses[-8:]
    assert len(recorder.losses) == 40
    assert sum(last) / 8 < 0.85 * sum(first) / 8, recorder.losses


def precompute_sdxl(data: str, out: str) -> None:
    """SDXL latents of ``data`` at 16 px with the test-size tiny_sdxl_cpu model (what the latents yaml trains on)."""
    from diffusion.pipeline.__main__ import main

    main(['precompute', '--input', data, '--out', out, '--config', TINY_XL_YAML, '--resolution', '16',
          '--batch-size', '16', '--no-progress', '--override', *TEST_XL_MODEL_OVERRIDES])  # fmt: skip


def test_tiny_sdxl_latents_yaml_trains_without_running_an_encoder(synthetic_dataset, tmp_path):
    from diffusion.config import load_config

    latents = str(tmp_path / 'latents')
    precompute_sdxl(synthetic_dataset, latents)
    yaml = os.path.join(REPO_ROOT, 'yamls', 'tiny_sdxl_latents_cpu.yaml')
    overrides = [*TEST_XL_MODEL_OVERRIDES, f'train_dataloader.remote={latents}', f'run_folder={tmp_path}/run',
                 'progress_bar=false', 'save_folder=null', 'max_duration=3ba',
                 'model.caption_drop_prob=0.5']  # fmt: skip
    trainer = build_trainer(load_config(yaml, overrides))
    model = trainer.state.model

    def fail(*args, **kwargs):
        raise AssertionError('an encoder ran on a batch of precomputed SDXL latents')

    model.vae.encode = fail
    model.text_encoder.forward = fail
    model.text_encoder_2.forward = fail
    recorder = LossRecorder()
    trainer.state.callbacks.append(recorder)
    trainer.fit()
    assert len(recorder.losses) == 3 and all(torch.isfinite(torch.tensor(recorder.losses)))
