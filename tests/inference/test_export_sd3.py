"""Export of the MMDiT family and of flow-trained models: a StableDiffusion3Pipeline folder that plain diffusers, in a
process that never imports this project, samples to the model's own images; loading it back rebuilds the
rectified-flow objective with its shift and the T5 mask; the sampling CLI takes an MMDiT checkpoint."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffusion.builders import build_trainer
from diffusion.config import load_config
from diffusion.inference import export as export_cli
from diffusion.inference.export import export_model
from diffusion.inference.loading import CONDITIONING_FILE, load_checkpoint
from diffusion.inference.sample import main as sample_cli
from diffusion.models.rectified_flow import RectifiedFlowObjective
from tests.conftest import build_tiny_sd
from tests.inference.test_sample import as_uint8, pixels
from tests.models.test_mmdit import MMDIT_YAML, TEST_SD3_VAE_OVERRIDE, build_tiny_sd3

PROMPTS = ['a red circle', 'two small blue squares']
SEEDS = [5, 6]
SAMPLING = dict(num_inference_steps=3, guidance_scale=3.0, height=16, width=16)

# Run by a fresh interpreter: plain diffusers and transformers only. It samples the folder twice with the same
# generators: from the prompts alone (``max_sequence_length`` = the exported T5 length), and with the T5 part of
# the embeddings recomputed with T5's attention mask and zeroed padding, as the model card shows.
DIFFUSERS_ONLY = """
import sys, torch
from diffusers import StableDiffusion3Pipeline
folder, out = sys.argv[1], sys.argv[2]
pipe = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True, use_safetensors=True)
n = pipe.tokenizer_3.model_max_length
prompts = {prompts!r}
sampling = dict(output_type='pt', **{sampling!r})
def generators():
    return [torch.Generator().manual_seed(s) for s in {seeds!r}]
plain = pipe(prompts, max_sequence_length=n, generator=generators(), **sampling).images
def t5(texts):
    tok = pipe.tokenizer_3(texts, padding='max_length', max_length=n, truncation=True, return_tensors='pt')
    return pipe.text_encoder_3(tok.input_ids, attention_mask=tok.attention_mask)[0] * tok.attention_mask[..., None]
with torch.no_grad():
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompts, prompts, prompts, negative_prompt=[''] * len(prompts), max_sequence_length=n)
    embeds[:, -n:], negative[:, -n:] = t5(prompts), t5([''] * len(prompts))
masked = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
              negative_pooled_prompt_embeds=negative_pooled, generator=generators(), **sampling).images
ours = sorted(m for m in sys.modules if m.split('.')[0] == 'diffusion')
torch.save({{'plain': plain, 'masked': masked, 'scheduler': type(pipe.scheduler).__name__,
            'shift': pipe.scheduler.config.shift, 'imported': ours}}, out)
"""


def sample_with_plain_diffusers(folder, tmp_path) -> dict:
    script = tmp_path / 'diffusers_only.py'
    script.write_text(DIFFUSERS_ONLY.format(prompts=PROMPTS, sampling=SAMPLING, seeds=SEEDS))
    out = tmp_path / 'theirs.pt'
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}  # the project is not importable there
    result = subprocess.run(
        [sys.executable, str(script), str(folder), str(out)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize('masked', [True, False], ids=['t5_masked_clip_12_tokens', 't5_unmasked'])
def test_sd3_export_samples_in_plain_diffusers_to_the_models_own_images(masked, tmp_path):
    torch.manual_seed(0)
    # The masked variant also shortens both CLIPs to 12 tokens: diffusers' pipeline reads that from the tokenizer.
    clip_max_length = 12 if masked else None
    objective = {'name': 'rectified_flow', 'shift': 3.0}
    model = build_tiny_sd3(use_attention_mask=masked, objective=objective, clip_max_length=clip_max_length).eval()
    written = export_model(model, str(tmp_path / 'export'))
    files = {os.path.relpath(os.path.join(r, n), written['pipeline']) for r, _, ns in os.walk(written['pipeline'])
             for n in ns}  # fmt: skip
    assert {'transformer/diffusion_pytorch_model.safetensors', 'text_encoder_3/model.safetensors'} <= files
    assert not [f for f in files if f.endswith(('.bin', '.pt', '.pkl', '.ckpt'))]
    assert json.loads((tmp_path / 'export' / CONDITIONING_FILE).read_text()) == {'use_attention_mask': masked}
    card = open(written['model_card']).read()
    assert 'StableDiffusion3Pipeline' in card and 'objective rectified flow' in card.lower()
    assert ('attention_mask=tok.attention_mask' in card) == masked and 'max_sequence_length=n' in card

    theirs = sample_with_plain_diffusers(tmp_path / 'export', tmp_path)
    assert theirs['imported'] == [] and theirs['scheduler'] == 'FlowMatchEulerDiscreteScheduler'
    assert theirs['shift'] == 3.0
    ours = model.generate(PROMPTS, seed=SEEDS, **SAMPLING)
    # The card's way for this model gives its images; the other way, another model's conditioning, does not.
    faithful, other = (theirs['masked'], theirs['plain']) if masked else (theirs['plain'], theirs['masked'])
    assert float((faithful.float() - ours).abs().max()) < 1e-4
    assert float((other.float() - ours).abs().max()) > 1e-3


def test_sd3_folder_loads_back_with_its_objective_shift_and_t5_mask(tmp_path):
    torch.manual_seed(0)
    model = build_tiny_sd3(objective={'name': 'rectified_flow', 'shift': 3.0}).eval()
    export_model(model, str(tmp_path / 'export'), model_card=False)
    loaded = load_checkpoint(str(tmp_path / 'export'))
    again = loaded.model
    assert type(again.conditioner).__name__ == 'SD3TextConditioner' and again.conditioner.use_attention_mask
    assert type(again.denoiser).__name__ == 'MMDiTDenoiser'
    assert isinstance(again.objective, RectifiedFlowObjective) and again.objective.shift == 3.0
    assert again.objective.default_scheduler == 'flow_euler'
    for name, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name
    assert torch.equal(again.generate(PROMPTS, seed=SEEDS, **SAMPLING), model.generate(PROMPTS, seed=SEEDS, **SAMPLING))
    # A folder without the record (e.g. one from the hub) runs T5 as diffusers does, unmasked.
    os.remove(tmp_path / 'export' / CONDITIONING_FILE)
    assert not load_checkpoint(str(tmp_path / 'export')).model.conditioner.use_attention_mask
    with pytest.raises(ValueError, match='single-file layout holds a UNet model.*StableDiffusion3Pipeline'):
        export_model(model, str(tmp_path / 'single'), single_file='sd3.safetensors')
    assert not (tmp_path / 'single').exists()


def test_a_flow_trained_unet_reloads_with_rectified_flow_and_its_shift(tmp_path):
    torch.manual_seed(0)
    model = build_tiny_sd(objective={'name': 'rectified_flow', 'shift': 2.5, 'inference_scheduler': 'flow_heun'})
    model.eval()
    written = export_model(model, str(tmp_path / 'export'))
    config = json.loads((tmp_path / 'export' / 'scheduler' / 'scheduler_config.json').read_text())
    assert config['_class_name'] == 'FlowMatchHeunDiscreteScheduler' and config['shift'] == 2.5
    assert 'init_noise_sigma = 1.0' in open(written['model_card']).read()
    again = load_checkpoint(str(tmp_path / 'export')).model
    assert isinstance(again.objective, RectifiedFlowObjective)
    assert (again.objective.shift, again.objective.default_scheduler) == (2.5, 'flow_heun')
    kwargs = dict(seed=[3], num_inference_steps=2, guidance_scale=2.0)
    assert torch.equal(again.generate(['a green triangle'], **kwargs), model.generate(['a green triangle'], **kwargs))


@pytest.fixture(scope='module')
def mmdit_checkpoint(synthetic_dataset, tmp_path_factory) -> str:
    """A tiny MMDiT trained for 2 batches with EMA; its Composer checkpoint."""
    folder = tmp_path_factory.mktemp('mmdit_run')
    cfg = load_config(
        MMDIT_YAML,
        [
            TEST_SD3_VAE_OVERRIDE,
            'model.max_length=8',
            'model.objective.shift=3.0',
            f'train_dataloader.remote={synthetic_dataset}',
            'train_dataloader.resolution=16',
            'train_dataloader.batch_size=4',
            'progress_bar=false',
            'max_duration=2ba',
            'save_interval=2ba',
            '+algorithms.ema={half_life: 1ba, ema_start: 1ba}',
            f'run_folder={folder}',
        ],
    )
    trainer = build_trainer(cfg)
    trainer.fit()
    trainer.close()
    return str(folder / 'checkpoints' / 'latest-rank0.pt')


def test_an_mmdit_checkpoint_exports_its_ema_weights_and_samples_with_the_cli(mmdit_checkpoint, tmp_path, capsys):
    loaded = load_checkpoint(mmdit_checkpoint)
    assert loaded.weights == 'ema' and loaded.batch == 2 and loaded.model.objective.shift == 3.0
    export_cli.main(['--checkpoint', mmdit_checkpoint, '--out', str(tmp_path / 'export')])
    assert 'StableDiffusion: EMA weights from' in capsys.readouterr().out
    again = load_checkpoint(str(tmp_path / 'export')).model
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name  # the export holds the EMA weights
    card = open(tmp_path / 'export' / 'README.md').read()
    assert 'the EMA average of the weights' in card and 'StableDiffusion3Pipeline' in card

    prompts = tmp_path / 'prompts.txt'
    prompts.write_text('a red circle\n')
    args = ['--checkpoint', mmdit_checkpoint, '--prompts', str(prompts), '--out', str(tmp_path / 'out'),
            '--seeds', '4', '--steps', '2', '--guidance-scale', '3', '--scheduler', 'flow_heun']  # fmt: skip
    rows = sample_cli(args)
    assert [r['file'] for r in rows] == ['00000_4.png']
    expected = loaded.model.generate(['a red circle'], seed=[4], num_inference_steps=2, guidance_scale=3.0,
                                     scheduler='flow_heun')[0]  # fmt: skip
    assert np.array_equal(pixels(tmp_path / 'out' / '00000_4.png'), as_uint8(expected))
