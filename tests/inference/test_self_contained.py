"""A checkpoint is self-contained: sampling and export need neither the pretrained folder its run loaded components
from (the demo's ``runs/demo_autoencoder/pretrained``, named relative to the training directory) nor a model hub."""

import os
import shutil

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from diffusion.builders import build_trainer
from diffusion.data.synthetic import write_synthetic_dataset
from diffusion.inference import export, sample
from diffusion.inference.loading import load_checkpoint, load_model
from tests.conftest import TEST_VAE, tiny_config

PROMPTS = ['a red circle', 'a blue square']
SETTINGS = dict(seed=[3, 4], num_inference_steps=2, guidance_scale=2.0)


def test_a_checkpoint_samples_and_exports_after_its_pretrained_folder_is_gone(tmp_path, monkeypatch):
    data = write_synthetic_dataset(str(tmp_path / 'data'), num_samples=16, image_size=16, progress=False)
    training = tmp_path / 'training'
    torch.manual_seed(5)
    AutoencoderKL(**TEST_VAE).save_pretrained(str(training / 'vae_run' / 'pretrained' / 'vae'))
    # As yamls/demo.yaml: the VAE comes from a folder named relative to the directory training runs in.
    monkeypatch.chdir(training)
    overrides = ('+model.pretrained_model_name_or_path=vae_run/pretrained', '+model.pretrained_components=[vae]',
                 'train_dataloader.batch_size=8', 'max_duration=2ba', 'save_interval=2ba')  # fmt: skip
    trainer = build_trainer(tiny_config(data, 'run', *overrides))
    trainer.fit()
    trained = trainer.state.model.eval()
    expected = trained.generate(PROMPTS, **SETTINGS)
    checkpoint = str(training / 'run' / 'checkpoints' / 'ep0-ba2-rank0.pt')

    # The pretrained folder is deleted, and the checkpoint is used from another directory.
    shutil.rmtree(training / 'vae_run')
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = load_checkpoint(checkpoint)
    assert loaded.config.model.pretrained_model_name_or_path == 'vae_run/pretrained'  # the run's config, as it was
    for name, value in trained.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name
    assert torch.equal(loaded.model.generate(PROMPTS, **SETTINGS), expected)

    written = export.main(['--checkpoint', checkpoint, '--out', 'export'])
    assert torch.equal(load_model(written['pipeline']).generate(PROMPTS, **SETTINGS), expected)

    (elsewhere / 'prompts.txt').write_text('\n'.join(PROMPTS) + '\n')
    sample.main(['--checkpoint', checkpoint, '--prompts', 'prompts.txt', '--out', 'samples', '--seeds', '3',
                 '--steps', '2', '--guidance-scale', '2'])  # fmt: skip
    first = trained.generate(PROMPTS[:1], seed=[3], num_inference_steps=2, guidance_scale=2.0)[0]
    pixels = (first.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(np.asarray(Image.open(elsewhere / 'samples' / '00000_3.png')), pixels)
    assert not os.path.exists(training / 'vae_run')
