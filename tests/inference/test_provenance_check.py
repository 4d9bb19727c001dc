"""The export CLI states a license mix only from the provenance report of the data the checkpoint trained on.

A run records its training data's fingerprint in its checkpoints (the dataset state Composer saves) and the data
pipeline's report records the fingerprint of the dataset it describes; export compares the two.
"""

import os

import pytest

from diffusion.builders import build_trainer
from diffusion.data.fingerprint import fingerprint_local
from diffusion.data.synthetic import write_synthetic_dataset
from diffusion.inference import export
from diffusion.pipeline.report import write_report
from tests.conftest import tiny_config
from tests.inference.test_export import assert_links_resolve_inside

CHECKPOINT = os.path.join('run', 'checkpoints', 'ep0-ba2-rank0.pt')


def dataset_with_report(folder, num_samples: int, licenses: list[str]) -> tuple[str, str]:
    """A synthetic dataset in ``folder/train`` and its provenance report in ``folder/report``."""
    data = str(folder / 'train')
    write_synthetic_dataset(data, num_samples=num_samples, seed=num_samples, image_size=16, progress=False)
    kept = {lic: licenses.count(lic) for lic in set(licenses)}
    stats = [{'stage': 'filter', 'unit': 0, 'seen': len(licenses), 'kept': kept, 'dropped': {},
              'dropped_samples': [], 'seconds': 0.1}]  # fmt: skip
    manifest = [{'key': str(i), 'source_url': f'https://example.org/{i}', 'attribution': 'A', 'license': lic}
                for i, lic in enumerate(licenses)]  # fmt: skip
    write_report({'filter': stats}, manifest, str(folder / 'report'), fingerprint=[fingerprint_local(data)])
    return data, str(folder / 'report' / 'provenance.json')


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """Two batches on 24 images (20 CC-BY, 4 CC-BY-NC) with their report beside them; another dataset of 16
    images (8 CC-BY-2.0, 8 CC-BY-SA-2.0) with its own report."""
    root = tmp_path_factory.mktemp('provenance_run')
    data, _ = dataset_with_report(root / 'data', 24, ['CC-BY-4.0'] * 20 + ['CC-BY-NC-2.0'] * 4)
    dataset_with_report(root / 'other', 16, ['CC-BY-2.0'] * 8 + ['CC-BY-SA-2.0'] * 8)
    cfg = tiny_config(data, str(root / 'run'), 'train_dataloader.batch_size=8', 'max_duration=2ba', 'save_interval=2ba')
    build_trainer(cfg).fit()
    yield root


def test_a_report_of_other_data_is_refused_naming_both_fingerprints(run, tmp_path):
    other = str(run / 'other' / 'report' / 'provenance.json')
    with pytest.raises(SystemExit) as error:
        export.main(['--checkpoint', str(run / CHECKPOINT), '--out', str(tmp_path / 'export'), '--provenance', other])
    message = str(error.value)
    trained, described = fingerprint_local(str(run / 'data' / 'train')), fingerprint_local(str(run / 'other' / 'train'))
    assert f'{other} describes {run}/other/train (16 samples, index.json sha256 {described["index_sha256"][:12]})' in (
        message
    )
    assert f'trained on {run}/data/train (24 samples, index.json sha256 {trained["index_sha256"][:12]})' in message
    assert '--force-provenance' in message
    assert not (tmp_path / 'export' / 'model_index.json').exists()  # refused before anything was written


def test_a_forced_report_is_stated_as_unverified(run, tmp_path):
    other = str(run / 'other' / 'report' / 'provenance.json')
    out = tmp_path / 'export'
    export.main(['--checkpoint', str(run / CHECKPOINT), '--out', str(out), '--provenance', other, '--force-provenance'])
    card = (out / 'README.md').read_text()
    assert f'the license mix below describes {run}/other/train (16 samples, index.json sha256 ' in card
    assert "which could not be verified to be this model's training data" in card
    assert '| CC-BY-2.0 | 8 | 50.0% |' in card and '| CC-BY-SA-2.0 | 8 | 50.0% |' in card
    assert sorted(assert_links_resolve_inside(out / 'README.md')) == [
        'ATTRIBUTION.txt',
        'attribution.jsonl',
        'provenance.json',
    ]


@pytest.mark.parametrize('given', [True, False], ids=['given', 'found beside the data'])
def test_the_report_of_the_training_data_states_the_mix_with_links_inside_the_export(run, tmp_path, given):
    out = tmp_path / 'export'
    provenance = ['--provenance', str(run / 'data' / 'report' / 'provenance.json')] if given else []
    export.main(['--checkpoint', str(run / CHECKPOINT), '--out', str(out), *provenance])
    card = (out / 'README.md').read_text()
    assert '| CC-BY-4.0 | 20 | 83.3% |' in card and '| CC-BY-NC-2.0 | 4 | 16.7% |' in card
    assert 'whose dataset fingerprint matches the one the checkpoint recorded' in card and 'Unverified' not in card
    assert f'- Training data (as the checkpoint records it): {run}/data/train (24 samples, ' in card
    assert sorted(assert_links_resolve_inside(out / 'README.md')) == [
        'ATTRIBUTION.txt',
        'attribution.jsonl',
        'provenance.json',
    ]
    assert (out / 'attribution.jsonl').read_text() == (run / 'data' / 'report' / 'attribution.jsonl').read_text()
    assert '../' not in card
