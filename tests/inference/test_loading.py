"""Loading Composer checkpoints for inference (EMA, embedded config, manifests, S3) and the export/sample CLIs on them.

One short training run with scheduled EMA, next to a data folder with a provenance report, serves the module.
"""

import os
import shutil

import numpy as np
import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image

from diffusion.builders import build_trainer
from diffusion.checkpointing import UntrustedCheckpointError, write_manifest
from diffusion.data.fingerprint import fingerprint_local
from diffusion.data.synthetic import write_synthetic_dataset
from diffusion.inference import export, sample
from diffusion.inference.loading import load_checkpoint, load_model
from diffusion.pipeline.report import write_report
from tests.conftest import tiny_config

CHECKPOINT = os.path.join('run', 'checkpoints', 'ep0-ba3-rank0.pt')


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """3 batches with EMA from batch 1, a checkpoint at batch 3; the data's provenance report in data/report."""
    root = tmp_path_factory.mktemp('inference_run')
    data = str(root / 'data' / 'train')
    write_synthetic_dataset(data, num_samples=24, seed=0, image_size=32, progress=False)
    stats = [{'stage': 'filter', 'unit': 0, 'seen': 24, 'kept': {'CC-BY-4.0': 20, 'CC-BY-NC-2.0': 4}, 'dropped': {},
              'dropped_samples': [], 'seconds': 0.1}]  # fmt: skip
    manifest = [{'key': str(i), 'source_url': f'https://example.org/{i}', 'attribution': 'A', 'license': lic}
                for i, lic in enumerate(['CC-BY-4.0'] * 20 + ['CC-BY-NC-2.0'] * 4)]  # fmt: skip
    write_report({'filter': stats}, manifest, str(root / 'data' / 'report'), fingerprint=[fingerprint_local(data)])
    ema = '+algorithms.ema={half_life: 1ba, ema_start: 1ba}'
    training = ('train_dataloader.batch_size=8', 'optimizer.lr=1e-2', 'max_duration=3ba', 'save_interval=3ba')
    cfg = tiny_config(data, str(root / 'run'), ema, *training)
    build_trainer(cfg).fit()
    yield root


def raw_state(path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=False)['state']


def unet_tensors(state: dict, source: str) -> dict[str, torch.Tensor]:
    """The UNet tensors of a checkpoint: the model's, or those the EMA algorithm holds."""
    if source == 'model':
        tensors = state['model']
    else:
        tensors = state['algorithms'][0][1]['ema_model']['named_parameters_dict']
    return {k[len('unet.') :]: v for k, v in tensors.items() if k.startswith('unet.')}


def test_ema_weights_by_default_training_weights_on_request(run):
    state = raw_state(run / CHECKPOINT)
    ema_state = state['algorithms'][0][1]
    # Composer swapped the average into the model for the save and holds the training weights meanwhile.
    assert ema_state['ema_started'] and ema_state['ema_weights_active']
    average, trained = unet_tensors(state, 'model'), unet_tensors(state, 'algorithm')
    assert any(not torch.equal(average[k], trained[k]) for k in average)

    loaded = load_checkpoint(str(run / CHECKPOINT))
    assert loaded.weights == 'ema' and loaded.batch == 3 and loaded.config_source == 'embedded in the checkpoint'
    assert 'EMA weights from' in loaded.describe()
    for name, value in loaded.model.unet.state_dict().items():
        assert torch.equal(value, average[name]), name
    raw = load_checkpoint(str(run / CHECKPOINT), use_ema=False)
    assert raw.weights == 'training'
    for name, value in raw.model.unet.state_dict().items():
        assert torch.equal(value, trained[name]), name


def test_ema_weights_are_found_when_the_model_holds_the_training_weights(run, tmp_path):
    # The other way round (saved with the training weights active): the average is in the algorithm's state.
    state = raw_state(run / CHECKPOINT)
    ema = state['algorithms'][0][1]
    average, trained = unet_tensors(state, 'model'), unet_tensors(state, 'algorithm')
    for name in trained:
        state['model'][f'unet.{name}'], ema['ema_model']['named_parameters_dict'][f'unet.{name}'] = (
            trained[name].clone(),
            average[name].clone(),
        )
    ema['ema_weights_active'] = False
    path = tmp_path / 'swapped.pt'
    torch.save({'state': state, 'rng': None}, path)
    write_manifest(path)
    model = load_model(str(path))  # config embedded: nothing else needed
    for name, value in model.unet.state_dict().items():
        assert torch.equal(value, average[name]), name
    training = load_model(str(path), use_ema=False)
    for name, value in training.unet.state_dict().items():
        assert torch.equal(value, trained[name]), name


def test_a_checkpoint_without_ema_gives_its_training_weights_and_says_so(run, tmp_path):
    state = raw_state(run / CHECKPOINT)
    state['algorithms'] = []  # as saved by a run without the ema algorithm
    path = tmp_path / 'plain.pt'
    torch.save({'state': state, 'rng': None}, path)
    write_manifest(path)
    loaded = load_checkpoint(str(path))
    assert loaded.weights == 'training' and loaded.has_ema is False
    assert 'training weights from' in loaded.describe() and '(it has no EMA weights)' in loaded.describe()
    for name, value in loaded.model.unet.state_dict().items():
        assert torch.equal(value, state['model'][f'unet.{name}']), name


def test_a_config_that_builds_another_architecture_is_refused(run, tmp_path):
    config = yaml.safe_load((run / 'run' / 'config.yaml').read_text())
    config['model']['unet_config']['block_out_channels'] = [8, 24]
    (tmp_path / 'wrong.yaml').write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=r'ep0-ba3-rank0\.pt does not fit the model built from its config \(.*wrong'):
        load_model(str(run / CHECKPOINT), config=str(tmp_path / 'wrong.yaml'))


def test_the_checkpoint_embeds_the_run_config(run):
    embedded = raw_state(run / CHECKPOINT)['callbacks']['RunConfigInCheckpoint']['config']
    config = yaml.safe_load(embedded)
    on_disk = yaml.safe_load((run / 'run' / 'config.yaml').read_text())
    assert config['model'] == on_disk['model'] and config['model']['unet_config']['block_out_channels'] == [8, 16]
    assert config['algorithms']['ema'] == {'half_life': '1ba', 'ema_start': '1ba'}


def test_without_an_embedded_config_the_run_folder_config_or_an_explicit_one_is_used(run, tmp_path):
    state = raw_state(run / CHECKPOINT)
    del state['callbacks']['RunConfigInCheckpoint']  # as saved before configs were embedded
    path = tmp_path / 'old' / 'checkpoints' / 'ep0-ba3-rank0.pt'
    path.parent.mkdir(parents=True)
    torch.save({'state': state, 'rng': None}, path)
    write_manifest(path)
    with pytest.raises(FileNotFoundError, match=r'No run config for .*searched .*old/checkpoints/config\.yaml, '
                                                r'.*old/config\.yaml') as error:  # fmt: skip
        load_model(str(path))
    assert 'Pass the training yaml with --config' in str(error.value)

    explicit = load_checkpoint(str(path), config=str(run / 'run' / 'config.yaml'))
    assert explicit.config_source == str(run / 'run' / 'config.yaml') and explicit.weights == 'ema'
    shutil.copy(run / 'run' / 'config.yaml', tmp_path / 'old' / 'config.yaml')  # the run folder's own config.yaml
    found = load_checkpoint(str(path))
    assert found.config_source == str(tmp_path / 'old' / 'config.yaml')
    for name, value in found.model.state_dict().items():
        assert torch.equal(value, explicit.model.state_dict()[name]), name


def test_checkpoints_without_a_matching_manifest_are_never_unpickled(run, tmp_path):
    copy = tmp_path / 'copy.pt'
    shutil.copy(run / CHECKPOINT, copy)
    with pytest.raises(UntrustedCheckpointError, match=r'copy\.pt has no SHA-256 manifest; refusing to unpickle'):
        load_model(str(copy))
    write_manifest(copy)
    with open(copy, 'ab') as f:
        f.write(b'\0')
    with pytest.raises(UntrustedCheckpointError, match='does not match its manifest'):
        load_model(str(copy))
    with pytest.raises(FileNotFoundError, match=r'Checkpoint not found: .*nothing\.pt'):
        load_model(str(tmp_path / 'nothing.pt'))
    with pytest.raises(ValueError, match=r'neither model_index\.json .* nor latest-rank0\.pt'):
        load_model(str(tmp_path))


def test_export_cli_writes_the_ema_weights_the_single_file_and_the_card(run, tmp_path):
    out = tmp_path / 'export'
    written = export.main(['--checkpoint', str(run / CHECKPOINT), '--out', str(out), '--single-file', 'cc.safetensors'])
    average = unet_tensors(raw_state(run / CHECKPOINT), 'model')
    exported = UNet2DConditionModel.from_pretrained(str(out / 'unet'))
    for name, value in exported.state_dict().items():
        assert torch.equal(value, average[name]), name

    again = StableDiffusionPipeline.from_single_file(written['single_file'], config=str(out), local_files_only=True,
                                                     safety_checker=None, requires_safety_checker=False)  # fmt: skip
    for name, value in again.unet.state_dict().items():
        assert torch.equal(value, average[name]), name

    card = (out / 'README.md').read_text()
    # The provenance report was found beside the training data (data/train -> data/report), describes the data the
    # checkpoint trained on, and is shipped in the export folder with the attribution manifest.
    assert '| CC-BY-4.0 | 20 | 83.3% |' in card and '| CC-BY-NC-2.0 | 4 | 16.7% |' in card
    assert '[`ATTRIBUTION.txt`](ATTRIBUTION.txt)' in card and (out / 'ATTRIBUTION.txt').is_file()
    assert '- EMA: yes (half_life=1ba, ema_start=1ba)' in card and 'Exported weights: the EMA average' in card
    assert '`cc.safetensors` holds the same weights' in card


def test_sampling_a_checkpoint_and_its_export_gives_the_same_images(run, tmp_path):
    export.export_model(load_model(str(run / CHECKPOINT)), str(tmp_path / 'export'), model_card=False)
    prompts = tmp_path / 'prompts.txt'
    prompts.write_text('a red circle\na blue square\n')
    common = ['--prompts', str(prompts), '--seeds', '0', '5', '--steps', '2', '--guidance-scale', '3']
    sample.main(['--checkpoint', str(run / CHECKPOINT), '--out', str(tmp_path / 'ckpt'), *common])
    sample.main(['--checkpoint', str(tmp_path / 'export'), '--out', str(tmp_path / 'folder'), *common])
    for name in ('00000_0.png', '00000_5.png', '00001_0.png', '00001_5.png'):
        a = np.asarray(Image.open(tmp_path / 'ckpt' / name))
        assert np.array_equal(a, np.asarray(Image.open(tmp_path / 'folder' / name))), name


@pytest.mark.remote
def test_a_checkpoint_on_s3_is_fetched_with_its_manifest(run, s3_server, tmp_path):
    import boto3

    s3 = boto3.client('s3', endpoint_url=s3_server)
    s3.upload_file(str(run / CHECKPOINT), 'test-bucket', 'runs/a/ckpt.pt')
    with pytest.raises(UntrustedCheckpointError, match=r's3://test-bucket/runs/a/ckpt\.pt has no SHA-256 manifest'):
        load_model('s3://test-bucket/runs/a/ckpt.pt')
    s3.upload_file(f'{run / CHECKPOINT}.sha256', 'test-bucket', 'runs/a/ckpt.pt.sha256')
    loaded = load_checkpoint('s3://test-bucket/runs/a/ckpt.pt')
    assert loaded.weights == 'ema' and loaded.config_source == 'embedded in the checkpoint'
    average = unet_tensors(raw_state(run / CHECKPOINT), 'model')
    for name, value in loaded.model.unet.state_dict().items():
        assert torch.equal(value, average[name]), name
    with pytest.raises(FileNotFoundError, match=r'Checkpoint not found: s3://test-bucket/runs/b/ckpt\.pt'):
        load_model('s3://test-bucket/runs/b/ckpt.pt')


def test_a_planted_checkpoint_with_a_manifest_of_its_own_never_runs_in_the_commands(tmp_path):
    # Sampling, export and the metrics command take any --checkpoint: the manifest must prove who wrote it.
    from diffusion.evaluation import metrics
    from tests.test_checkpointing import plant_with_manifest

    marker = tmp_path / 'payload-ran'
    evil = plant_with_manifest(tmp_path / 'evil.pt', marker)
    (tmp_path / 'prompts.txt').write_text('a red circle\n')
    prompts = ['--prompts', str(tmp_path / 'prompts.txt')]
    commands = {
        'load_model': lambda: load_model(str(evil)),
        'sample': lambda: sample.main(['--checkpoint', str(evil), '--out', str(tmp_path / 'samples'), *prompts]),
        'export': lambda: export.main(['--checkpoint', str(evil), '--out', str(tmp_path / 'export')]),
        'metrics': lambda: metrics.main(
            ['--checkpoint', str(evil), '--images', str(tmp_path / 'images'), '--clip-model', 'x', *prompts]
        ),
    }
    for name, command in commands.items():
        with pytest.raises(UntrustedCheckpointError, match=r'evil\.pt\.sha256 is not signed'):
            command()
        assert not marker.exists(), name


@pytest.mark.parametrize('damage', ['empty', 'partial', 'unexpected'])
def test_a_checkpoint_whose_weights_do_not_fit_names_a_few_keys_and_counts(run, tmp_path, damage):
    from tests.test_checkpointing import damage_model_state

    path = tmp_path / 'damaged.pt'
    shutil.copy(run / CHECKPOINT, path)
    names = damage_model_state(path, damage)
    unet = [name for name in names if name.startswith('unet.')]
    expected = {
        'empty': f'{len(names)} missing ({", ".join(names[:3])}, ...), 0 unexpected.',
        'partial': f'{len(unet)} missing ({", ".join(unet[:3])}, ...), 0 unexpected.',
        'unexpected': '0 missing, 2 unexpected (unet.extra.bias, unet.extra.weight).',
    }[damage]
    with pytest.raises(ValueError, match=r'damaged\.pt does not fit the model built from its config') as error:
        load_model(str(path))
    assert expected in str(error.value) and len(str(error.value)) < 600
