"""Export to a diffusers folder: loads with diffusers and draws the model's own image; dtype; the model card."""

import os
import re

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from omegaconf import OmegaConf
from safetensors import safe_open

from diffusion.inference.export import export_model
from diffusion.inference.loading import load_checkpoint, load_model
from diffusion.inference.model_card import ProvenanceMismatchError, license_obligations, read_license_mix
from diffusion.models import tiny_stable_diffusion_xl
from diffusion.pipeline.report import write_report
from tests.conftest import build_tiny_sd

LICENSES = ['CC-BY-4.0'] * 5 + ['CC-BY-NC-SA-2.0'] * 3 + ['CC0-1.0'] * 2
# The fingerprints (diffusion.data.fingerprint) of the data a report describes and of other data.
DATA = [{'location': 'data/captioned', 'index_sha256': 'c0ffee' + '0' * 58, 'num_samples': 10}]
OTHER = [{'location': 'data/demo/train', 'index_sha256': 'abcdef' + '1' * 58, 'num_samples': 4000}]
LINK = re.compile(r'\]\(([^)\s]*)\)|<([^>\s]+)>')


def assert_links_resolve_inside(card_path) -> list[str]:
    """Every link of the card is an absolute URL or a file inside the export folder; returns the links."""
    folder = os.path.dirname(os.path.abspath(card_path))
    links = [a or b for a, b in LINK.findall(open(card_path).read())]
    for link in links:
        if re.match(r'^[a-z][a-z0-9+.-]*://', link):
            continue
        target = os.path.normpath(os.path.join(folder, link))
        assert os.path.commonpath([target, folder]) == folder, f'{link} leaves the export folder'
        assert os.path.isfile(target), f'{link} does not resolve'
    return links


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return build_tiny_sd(inference_scheduler='dpm++', prediction_type='v_prediction').eval()


def write_provenance(folder, fingerprint=DATA) -> dict:
    """A provenance report of 10 images (5 CC-BY, 3 CC-BY-NC-SA, 2 CC0) as the data pipeline writes it, of the
    dataset whose fingerprint is ``fingerprint``."""
    kept = {lic: LICENSES.count(lic) for lic in set(LICENSES)}
    stats = [{'stage': 'filter', 'unit': 0, 'seen': 12, 'kept': kept, 'dropped': {'resolution': {'CC-BY-4.0': 2}},
              'dropped_samples': [], 'seconds': 1.0}]  # fmt: skip
    manifest = [
        {'key': f'img{i}', 'source_url': f'https://example.org/{i}', 'attribution': f'Author {i}', 'license': lic}
        for i, lic in enumerate(LICENSES)
    ]
    return write_report({'filter': stats}, manifest, str(folder), fingerprint=fingerprint)


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
    # No --provenance: the card finds the report beside the training data (data/captioned -> data/report), and
    # it describes the data the checkpoint records.
    written = export_model(
        model, str(tmp_path / 'export'), config=config, weights='ema', batch=20, data_fingerprint=DATA
    )
    card = open(written['model_card']).read()
    assert '# cc-tiny' in card and 'library_name: diffusers' in card
    assert '| CC-BY-4.0 | 5 | 50.0% |' in card
    assert '| CC-BY-NC-SA-2.0 | 3 | 30.0% |' in card
    assert '| CC0-1.0 | 2 | 20.0% |' in card
    assert '| **total** | 10 | 100% |' in card
    # The report and the manifest are shipped in the export folder and linked there.
    assert '[`ATTRIBUTION.txt`](ATTRIBUTION.txt)' in card and '[`attribution.jsonl`](attribution.jsonl)' in card
    assert '[`provenance.json`](provenance.json), whose dataset fingerprint matches' in card
    assert sorted(assert_links_resolve_inside(written['model_card'])) == sorted(
        ['provenance.json', 'ATTRIBUTION.txt', 'attribution.jsonl']
    )
    shipped = (tmp_path / 'export' / 'ATTRIBUTION.txt').read_text()
    assert shipped == (tmp_path / 'data' / 'report' / 'ATTRIBUTION.txt').read_text()
    assert (
        '- Training data (as the checkpoint records it): data/captioned (10 samples, index.json sha256 c0ffee' in card
    )
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


def test_a_given_report_of_other_data_is_refused_naming_both_before_anything_is_written(model, tmp_path):
    write_provenance(tmp_path / 'report', fingerprint=DATA)
    provenance = str(tmp_path / 'report' / 'provenance.json')
    with pytest.raises(ProvenanceMismatchError) as error:
        export_model(model, str(tmp_path / 'export'), provenance=provenance, data_fingerprint=OTHER)
    message = str(error.value)
    assert f'{provenance} describes data/captioned (10 samples, index.json sha256 c0ffee000000)' in message
    assert 'but the model was trained on data/demo/train (4000 samples, index.json sha256 abcdef111111)' in message
    assert '--force-provenance' in message
    assert not (tmp_path / 'export').exists()

    # A report or a model without a fingerprint cannot be verified either.
    write_provenance(tmp_path / 'old', fingerprint=None)
    with pytest.raises(ProvenanceMismatchError, match='records no fingerprint of the dataset it describes'):
        export_model(model, str(tmp_path / 'export'), provenance=str(tmp_path / 'old' / 'provenance.json'),
                     data_fingerprint=OTHER)  # fmt: skip
    with pytest.raises(ProvenanceMismatchError, match='the model records no fingerprint of its training data'):
        export_model(model, str(tmp_path / 'export'), provenance=provenance)
    with pytest.raises(ValueError, match='is not an absolute URL'):
        export_model(model, str(tmp_path / 'export'), attribution_url='../data/ATTRIBUTION.txt')
    assert not (tmp_path / 'export').exists()


def test_a_forced_report_is_stated_as_unverified_and_the_matching_one_as_the_mix(model, tmp_path):
    write_provenance(tmp_path / 'report', fingerprint=DATA)
    provenance = str(tmp_path / 'report' / 'provenance.json')
    forced = export_model(model, str(tmp_path / 'forced'), provenance=provenance, data_fingerprint=OTHER,
                          force_provenance=True, attribution_url='https://example.org/ATTRIBUTION.txt')  # fmt: skip
    card = open(forced['model_card']).read()
    assert (
        '**Unverified:** the license mix below describes data/captioned (10 samples, index.json sha256 c0ffee000000), '
        "which could not be verified to be this model's training data" in card
    )
    assert '| CC-BY-4.0 | 5 | 50.0% |' in card and 'whose dataset fingerprint matches' not in card
    links = assert_links_resolve_inside(forced['model_card'])
    assert 'https://example.org/ATTRIBUTION.txt' in links and 'provenance.json' in links

    matching = export_model(model, str(tmp_path / 'matching'), provenance=provenance, data_fingerprint=DATA)
    card = open(matching['model_card']).read()
    assert 'Unverified' not in card and '| CC-BY-4.0 | 5 | 50.0% |' in card
    assert 'whose dataset fingerprint matches the one the checkpoint recorded' in card
    assert_links_resolve_inside(matching['model_card'])


def test_a_report_found_beside_the_data_that_describes_other_data_leaves_the_mix_unknown(model, tmp_path):
    write_provenance(tmp_path / 'data' / 'report', fingerprint=DATA)
    config = OmegaConf.create({'run_name': 'r', 'model': {'name': 'm'}, 'max_duration': '1ba',
                               'train_dataloader': {'remote': str(tmp_path / 'data' / 'train')}})  # fmt: skip
    written = export_model(model, str(tmp_path / 'export'), config=config, data_fingerprint=OTHER)
    card = open(written['model_card']).read()
    assert 'The license mix of the training data is **unknown**' in card
    assert 'describes data/captioned (10 samples, index.json sha256 c0ffee000000), but the model was trained on ' \
           'data/demo/train (4000 samples, index.json sha256 abcdef111111)' in card  # fmt: skip
    assert '| CC-' not in card and 'License obligations\n\nUnknown' in card
    assert not (tmp_path / 'export' / 'provenance.json').exists()
    assert assert_links_resolve_inside(written['model_card']) == []


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


@pytest.mark.parametrize('flag', ['--out', '--single-file'])
def test_an_output_that_cannot_be_written_is_named_before_the_model_loads(flag, tmp_path, monkeypatch):
    from diffusion.inference import export as export_module

    def load_checkpoint(*args, **kwargs):
        raise AssertionError('the model was loaded before the output folder was checked')

    monkeypatch.setattr(export_module, 'load_checkpoint', load_checkpoint)
    (tmp_path / 'file').write_text('')
    blocked = tmp_path / 'file' / 'export'
    args = {'--out': str(tmp_path / 'export'), '--single-file': str(tmp_path / 'model.safetensors')}
    args[flag] = str(blocked / 'model.safetensors') if flag == '--single-file' else str(blocked)
    with pytest.raises(SystemExit, match=rf'^error: {flag} {blocked}: cannot write there \(Not a directory\)\.$'):
        export_module.main(['--checkpoint', 'x', *(item for pair in args.items() for item in pair)])
