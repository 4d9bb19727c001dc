"""Export to a diffusers folder: loads with diffusers and draws the model's own image; dtype; the model card."""

import os

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from omegaconf import OmegaConf
from safetensors import safe_open

from diffusion.inference.export import export_model
from diffusion.inference.loading import load_checkpoint, load_model
from diffusion.inference.model_card import license_obligations, read_license_mix
from diffusion.models import tiny_stable_diffusion_xl
from diffusion.pipeline.report import write_report
from tests.conftest import build_tiny_sd

LICENSES = ['CC-BY-4.0'] * 5 + ['CC-BY-NC-SA-2.0'] * 3 + ['CC0-1.0'] * 2


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return build_tiny_sd(inference_scheduler='dpm++', prediction_type='v_prediction').eval()


def write_provenance(folder) -> dict:
    """A provenance report of 10 images (5 CC-BY, 3 CC-BY-NC-SA, 2 CC0) as the data pipeline writes it."""
    kept = {lic: LICENSES.count(lic) for lic in set(LICENSES)}
    stats = [{'stage': 'filter', 'unit': 0, 'seen': 12, 'kept': kept, 'dropped': {'resolution': {'CC-BY-4.0': 2}},
              'dropped_samples': [], 'seconds': 1.0}]  # fmt: skip
    manifest = [
        {'key': f'img{i}', 'source_url': f'https://example.org/{i}', 'attribution': f'Author {i}', 'license': lic}
        for i, lic in enumerate(LICENSES)
    ]
    return write_report({'filter': stats}, manifest, str(folder))


def test_exported_folder_loads_in_diffusers_and_draws_the_image_generate_draws(model, tmp_path):
    written = export_model(model, str(tmp_path / 'export'))
    files = sorted(os.path.relpath(os.path.join(r, n), tmp_path / 'export') for r, _, ns in os.walk(written['pipeline'])
                   for n in ns)  # fmt: skip
    assert 'unet/diffusion_pytorch_model.safetensors' in files and 'text_encoder/model.safetensors' in files
    assert not [f for f in files if f.endswith(('.bin', '.pt', '.pkl', '.ckpt'))]

    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / 'export'), local_files_only=True)
    assert type(pipe.scheduler).__name__ == 'DPMSolverMultistepScheduler'
    assert pipe.scheduler.config.prediction_type == 'v_prediction'
    prompts = ['a red circle', 'a blue square']
    generators = [torch.Generator().manual_seed(s) for s in (11, 12)]
    theirs = pipe(prompts, generator=generators, num_inference_steps=3, guidance_scale=4.0, output_type='pt').images
    ours = model.generate(prompts, seed=[11, 12], num_inference_steps=3, guidance_scale=4.0)
    torch.testing.assert_close(theirs.float(), ours, rtol=0, atol=1e-6)


def test_loading_an_exported_folder_gives_back_the_same_model(model, tmp_path):
    export_model(model, str(tmp_path / 'export'), model_card=False)
    loaded = load_checkpoint(str(tmp_path / 'export'))
    assert loaded.weights == 'pipeline' and loaded.config is None
    again = loaded.model
    assert type(again).__name__ == 'StableDiffusion' and again.objective.default_scheduler == 'dpm++'
    assert again.objective.prediction_type == 'v_prediction'
    for name, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name
    kwargs = dict(seed=[3], num_inference_steps=2, guidance_scale=2.0)
    assert torch.equal(again.generate(['a green triangle'], **kwargs), model.generate(['a green triangle'], **kwargs))


def test_fp16_export_halves_the_files_and_leaves_the_model_alone(model, tmp_path):
    export_model(model, str(tmp_path / 'half'), dtype='fp16', single_file='half.safetensors', model_card=False)
    assert next(model.unet.parameters()).dtype == torch.float32  # the model itself was not cast
    with safe_open(str(tmp_path / 'half' / 'unet' / 'diffusion_pytorch_model.safetensors'), 'pt') as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    half = load_model(str(tmp_path / 'half'))  # diffusers loads the fp16 weights as fp32, which CPUs sample in
    for name, value in model.unet.state_dict().items():
        assert torch.equal(half.unet.state_dict()[name], value.half().float()), name
    assert (tmp_path / 'half' / 'half.safetensors').is_file()
    with pytest.raises(ValueError, match=r"Unknown dtype 'int8'. Valid values: fp32, fp16, bf16"):
        export_model(model, str(tmp_path / 'bad'), dtype='int8')


def test_model_card_states_the_license_mix_obligations_and_links_the_attribution(model, tmp_path):
    write_provenance(tmp_path / 'data' / 'report')
    config = OmegaConf.create({
        'run_name': 'cc-tiny', 'model': {'name': 'tiny_stable_diffusion'}, 'max_duration': '20ba',
        'train_dataloader': {'name': 'image_caption', 'remote': str(tmp_path / 'data' / 'captioned'),
                             'batch_size': 16, 'resolution': 32},
        'optimizer': {'name': 'adamw', 'lr': 5e-4}, 'algorithms': {'ema': {'half_life': '2ba'}}, 'precision': None,
    })  # fmt: skip
    # No --provenance: the card finds the report beside the training data (data/captioned -> data/report).
    written = export_model(model, str(tmp_path / 'export'), config=config, weights='ema', batch=20)
    card = open(written['model_card']).read()
    assert '# cc-tiny' in card and 'library_name: diffusers' in card
    assert '| CC-BY-4.0 | 5 | 50.0% |' in card
    assert '| CC-BY-NC-SA-2.0 | 3 | 30.0% |' in card
    assert '| CC0-1.0 | 2 | 20.0% |' in card
    assert '| **total** | 10 | 100% |' in card
    assert '[`ATTRIBUTION.txt`](../data/report/ATTRIBUTION.txt)' in card
    assert os.path.isfile(tmp_path / 'export' / '../data/report/ATTRIBUTION.txt')  # the link resolves
    assert '8 of 10 images (80.0%) are under licenses that require crediting' in card
    assert '3 of 10 images (30.0%) are under non-commercial licenses' in card
    assert 'non-commercial only' in card
    assert '- EMA: yes (half_life=2ba)' in card and 'Exported weights: the EMA average' in card
    assert '- Duration: 20ba (checkpoint at batch 20)' in card
    params = sum(p.numel() for p in model.unet.parameters())
    assert f'| unet | UNet2DConditionModel | {params:,} |' in card
    assert "StableDiffusionPipeline.from_pretrained('path/to/this/folder')" in card


def test_model_card_without_a_provenance_report_says_the_mix_is_unknown(model, tmp_path):
    config = OmegaConf.create({'run_name': 'r', 'model': {'name': 'm'}, 'max_duration': '1ba',
                               'train_dataloader': {'remote': str(tmp_path / 'nowhere')}})  # fmt: skip
    card = open(export_model(model, str(tmp_path / 'export'), config=config)['model_card']).read()
    assert 'The license mix of the training data is **unknown**' in card
    assert str(tmp_path / 'nowhere' / 'provenance.json') in card  # says where it looked
    assert '| CC-' not in card and 'non-commercial only' not in card
    assert 'License obligations\n\nUnknown' in card


def test_license_obligations_follow_the_license_elements(tmp_path):
    assert license_obligations({'CC0-1.0': 4, 'PDM': 1}) == [
        'The training images are public domain or CC0: no attribution or use restriction applies.'
    ]
    lines = license_obligations({'CC-BY-SA-4.0': 1, 'CC-BY-ND-2.0': 1})
    assert [line.split(':')[0] for line in lines] == [
        '**Attribution (CC BY)',
        '**ShareAlike (SA)',
        '**NoDerivatives (ND)',
    ]
    (tmp_path / 'provenance.json').write_text('{"stages": []}')
    with pytest.raises(ValueError, match='is not a provenance report'):
        read_license_mix(str(tmp_path / 'provenance.json'))
    with pytest.raises(FileNotFoundError, match='Provenance report not found'):
        read_license_mix(str(tmp_path / 'missing.json'))


def test_sdxl_export_loads_in_diffusers_and_back_and_draws_the_same_image(tmp_path):
    model = tiny_stable_diffusion_xl(inference_scheduler='euler').eval()
    written = export_model(model, str(tmp_path / 'xl'), single_file='xl.safetensors')
    card = open(written['model_card']).read()
    assert (
        'diffusers `StableDiffusionXLPipeline`' in card and '| text_encoder_2 | CLIPTextModelWithProjection |' in card
    )

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / 'xl'), local_files_only=True)
    assert type(pipe.scheduler).__name__ == 'EulerDiscreteScheduler'
    prompts = ['a red circle', 'a blue square']
    generators = [torch.Generator().manual_seed(s) for s in (4, 9)]
    theirs = pipe(prompts, generator=generators, num_inference_steps=2, guidance_scale=3.0, output_type='pt').images
    ours = model.generate(prompts, seed=[4, 9], num_inference_steps=2, guidance_scale=3.0)
    torch.testing.assert_close(theirs.float(), ours, rtol=0, atol=1e-6)

    again = load_model(str(tmp_path / 'xl'))
    assert type(again.conditioner).__name__ == 'SDXLTextConditioner' and again.objective.default_scheduler == 'euler'
    assert torch.equal(again.generate(prompts, seed=[4, 9], num_inference_steps=2, guidance_scale=3.0), ours)
