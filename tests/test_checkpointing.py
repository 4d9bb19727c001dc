"""Safe checkpoint loading: signed manifests at save time, refusal of untrusted, tampered or planted pickles on load.

Every refusal test plants a live payload (unpickling it creates a marker file, as
``test_the_planted_payload_runs_when_unpickled`` shows) and asserts both the error and that the marker is absent.
The signing key is the test session's (``checkpoint_key`` in ``tests/conftest.py``), never the user's.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pathlib
import pickle
import re
import secrets
import shutil
import stat
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from diffusion import checkpointing
from diffusion.builders import build_trainer
from diffusion.checkpointing import (
    KEY_ENV,
    KEY_FILE_ENV,
    MANIFEST_SUFFIX,
    SIGN_COMMAND,
    VALIDATION_FUNCTION,
    CheckpointKeyError,
    ManifestCheckpointSaver,
    UntrustedCheckpointError,
    default_key_file,
    guard_checkpoint_loading,
    is_inside,
    validate_checkpoint,
    write_manifest,
)
from tests.conftest import REPO_ROOT, build_tiny_sd, subprocess_env, tiny_config

CHECKPOINT = 'ep0-ba2-rank0.pt'


class Payload:
    """Unpickling this creates ``marker``: a stand-in for arbitrary code in a pickle."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def plant_payload(path: pathlib.Path, marker: pathlib.Path, plain: bool = False) -> pathlib.Path:
    """Write a file at ``path`` whose unpickling touches ``marker``: a ``torch.save`` checkpoint, or with ``plain`` a
    bare pickle like the ``.metadata`` of a sharded checkpoint."""
    if plain:
        path.write_bytes(pickle.dumps(Payload(marker)))
    else:
        torch.save({'state': Payload(marker), 'rng': None}, path)
    return path


def signed_manifest(data: bytes, name: str) -> str:
    """The manifest of a file holding ``data``, computed here from the session's key: sha256sum's line, then the
    HMAC-SHA-256 of the digest under the key, named by the key's id."""
    key = bytes.fromhex(pathlib.Path(os.environ[KEY_FILE_ENV]).read_text())
    digest = hashlib.sha256(data).hexdigest()
    key_id = hmac.new(key, b'diffusion checkpoint key id', hashlib.sha256).hexdigest()[:16]
    signature = hmac.new(key, b'diffusion checkpoint sha256 ' + digest.encode(), hashlib.sha256).hexdigest()
    return f'{digest}  {name}\n# hmac-sha256 key {key_id} {signature}\n'


def flip_byte(path: pathlib.Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(autouse=True)
def isolated_validation(monkeypatch):
    """Undo the process-wide validation hook and fetched manifests after each test."""
    monkeypatch.delenv('CHECKPOINT_VALIDATION_FUNCTION', raising=False)
    monkeypatch.setattr(checkpointing, '_fetched_manifests', {})


@pytest.fixture
def marker(tmp_path) -> pathlib.Path:
    return tmp_path / 'payload-ran'


@pytest.mark.parametrize('plain', [False, True])
def test_the_planted_payload_runs_when_unpickled(tmp_path, marker, plain):
    # The control for every refusal below: the payload is live under Composer's torch.load(weights_only=False) and
    # under the plain pickle.load that reads a sharded checkpoint's .metadata.
    path = plant_payload(tmp_path / 'evil', marker, plain=plain)
    if plain:
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


# Manifests and validate_checkpoint on files.


def test_the_manifest_is_signed_and_sha256sum_still_checks_it(tmp_path):
    data = os.urandom(1000)
    path = tmp_path / 'ck.pt'
    path.write_bytes(data)
    manifest = write_manifest(path)
    assert manifest == f'{path}{MANIFEST_SUFFIX}'
    assert pathlib.Path(manifest).read_text() == signed_manifest(data, 'ck.pt')
    assert validate_checkpoint(path) is True
    if shutil.which('sha256sum'):  # the signature is a '#' line, which sha256sum -c skips
        checked = subprocess.run(
            ['sha256sum', '-c', '--strict', manifest], cwd=tmp_path, capture_output=True, text=True
        )
        assert checked.returncode == 0 and checked.stdout == 'ck.pt: OK\n', checked.stderr


def test_a_file_without_manifest_is_refused(tmp_path, marker):
    evil = plant_payload(tmp_path / 'evil.pt', marker)
    with pytest.raises(UntrustedCheckpointError, match='evil.pt has no SHA-256 manifest; refusing to unpickle') as e:
        validate_checkpoint(evil)
    assert str(e.value).endswith(f'{SIGN_COMMAND} {evil}')  # how to vouch for it
    assert not marker.exists()


@pytest.mark.parametrize('damage', ['flip', 'truncate', 'append'])
def test_a_file_that_differs_from_its_manifest_is_refused(tmp_path, damage):
    path = tmp_path / 'ck.pt'
    path.write_bytes(os.urandom(1000))
    write_manifest(path)
    if damage == 'flip':
        flip_byte(path)
    elif damage == 'truncate':
        path.write_bytes(path.read_bytes()[:-1])
    else:
        path.write_bytes(path.read_bytes() + b'x')
    with pytest.raises(
        UntrustedCheckpointError, match=r'ck.pt does not match its manifest .*\(tampered or truncated\)'
    ):
        validate_checkpoint(path)


def test_a_payload_behind_the_original_manifest_is_refused(tmp_path, marker):
    path = tmp_path / 'ck.pt'
    torch.save({'state': {'weight': torch.ones(3)}}, path)
    write_manifest(path)
    plant_payload(path, marker)
    with pytest.raises(UntrustedCheckpointError, match='does not match its manifest'):
        validate_checkpoint(path)
    assert not marker.exists()


def test_a_malformed_manifest_is_refused(tmp_path):
    path = tmp_path / 'ck.pt'
    path.write_bytes(b'weights')
    pathlib.Path(f'{path}{MANIFEST_SUFFIX}').write_text('not a digest\n')
    with pytest.raises(UntrustedCheckpointError, match='is not a SHA-256 manifest'):
        validate_checkpoint(path)


def test_symlinks_are_checked_against_the_manifest_of_their_target(tmp_path):
    # Composer validates a symlink to load_path in a temporary folder; the manifest lies beside the real file.
    path = tmp_path / 'run' / 'ck.pt'
    path.parent.mkdir()
    path.write_bytes(b'weights')
    write_manifest(path)
    link = tmp_path / 'rank0_checkpoint'
    link.symlink_to(path)
    assert validate_checkpoint(link) is True
    flip_byte(path, offset=0)
    with pytest.raises(UntrustedCheckpointError, match=f'{re.escape(str(path))} does not match'):
        validate_checkpoint(link)


def test_composer_runs_the_hook_before_torch_load(tmp_path, marker, monkeypatch):
    from composer.utils.checkpoint import _get_checkpoint_validation_function, _torch_load_with_validation

    monkeypatch.setenv('CHECKPOINT_VALIDATION_FUNCTION', VALIDATION_FUNCTION)
    assert _get_checkpoint_validation_function() is validate_checkpoint
    good = tmp_path / 'good.pt'
    torch.save({'state': {'weight': torch.arange(3)}}, good)
    write_manifest(good)
    assert torch.equal(_torch_load_with_validation(good, 'cpu')['state']['weight'], torch.arange(3))
    with pytest.raises(UntrustedCheckpointError, match='has no SHA-256 manifest'):
        _torch_load_with_validation(plant_payload(tmp_path / 'evil.pt', marker), 'cpu')
    assert not marker.exists()


def test_sharded_metadata_and_shards_are_checked_before_unpickling(tmp_path, marker, monkeypatch):
    # FSDP sharded checkpoints: Composer reads `.metadata` with plain pickle through this reader.
    import torch.distributed.checkpoint as dist_cp
    from composer.utils.checkpoint import FileSystemReaderWithValidation

    monkeypatch.setenv('CHECKPOINT_VALIDATION_FUNCTION', VALIDATION_FUNCTION)
    folder = tmp_path / 'ep0-ba2'
    dist_cp.save({'weight': torch.arange(8.0)}, storage_writer=dist_cp.FileSystemWriter(folder))
    for name in ('.metadata', '__0_0.distcp'):
        write_manifest(folder / name)
    loaded = {'weight': torch.zeros(8)}
    dist_cp.load(loaded, storage_reader=FileSystemReaderWithValidation(str(folder)))
    assert torch.equal(loaded['weight'], torch.arange(8.0))

    flip_byte(folder / '__0_0.distcp', offset=-1)
    # torch.distributed.checkpoint re-raises the reader's error, with its message, as a CheckpointException.
    with pytest.raises(dist_cp.CheckpointException, match=r'UntrustedCheckpointError: .*__0_0.distcp does not match'):
        dist_cp.load(loaded, storage_reader=FileSystemReaderWithValidation(str(folder)))
    plant_payload(folder / '.metadata', marker, plain=True)
    with pytest.raises(UntrustedCheckpointError, match=r'\.metadata does not match its manifest'):
        FileSystemReaderWithValidation(str(folder)).read_metadata()
    assert not marker.exists()


# The trust policy.


@pytest.mark.parametrize(
    'path, folder, inside',
    [
        ('runs/a/checkpoints/ep0-ba2-rank0.pt', 'runs/a/checkpoints', True),
        ('runs/a/checkpoints/ep0-ba2', 'runs/a/checkpoints/', True),
        ('runs/a/checkpoints-old/ep0-ba2-rank0.pt', 'runs/a/checkpoints', False),
        ('runs/a/checkpoints/../../b/ep0-ba2-rank0.pt', 'runs/a/checkpoints', False),
        ('runs/b/checkpoints/ep0-ba2-rank0.pt', 'runs/a/checkpoints', False),
        ('s3://bucket/run/checkpoints/ep0-ba2-rank0.pt', 's3://bucket/run/checkpoints', True),
        ('s3://bucket/run/checkpoints/../other/x.pt', 's3://bucket/run/checkpoints', False),
        ('s3://other/run/checkpoints/ep0-ba2-rank0.pt', 's3://bucket/run/checkpoints', False),
        ('gs://bucket/run/checkpoints/ep0-ba2-rank0.pt', 's3://bucket/run/checkpoints', False),
        ('/bucket/run/checkpoints/ep0-ba2-rank0.pt', 's3://bucket/run/checkpoints', False),
    ],
)
def test_is_inside(path, folder, inside):
    assert is_inside(path, folder) is inside


def test_a_symlink_out_of_the_save_folder_is_not_inside_it(tmp_path):
    (tmp_path / 'checkpoints').mkdir()
    (tmp_path / 'checkpoints' / 'latest.pt').symlink_to(tmp_path / 'elsewhere.pt')
    assert not is_inside(str(tmp_path / 'checkpoints' / 'latest.pt'), str(tmp_path / 'checkpoints'))


def guard_config(**overrides):
    fields = dict(
        run_name='run', save_folder='runs/{run_name}/checkpoints', load_path=None, load_trusted=False, autoresume=False
    )
    return OmegaConf.create({**fields, **overrides})


def test_guard_refuses_a_load_path_outside_the_save_folder():
    cfg = guard_config(load_path='downloads/model.pt')
    with pytest.raises(ValueError, match=r"load_path='downloads/model.pt' is outside this run's save_folder "):
        guard_checkpoint_loading(cfg)
    with pytest.raises(ValueError, match='set load_trusted=true only if you trust this file'):
        guard_checkpoint_loading(guard_config(load_path='downloads/model.pt', save_folder=None))
    assert 'CHECKPOINT_VALIDATION_FUNCTION' not in os.environ  # refused before anything else


@pytest.mark.parametrize(
    'overrides',
    [
        dict(load_path='runs/run/checkpoints/ep0-ba2-rank0.pt'),  # the run's own folder, after {run_name}
        dict(load_path='downloads/model.pt', load_trusted=True),
        dict(autoresume=True),
        dict(),
    ],
)
def test_guard_accepts_trusted_paths_and_installs_the_hook(overrides):
    from composer.utils.checkpoint import _get_checkpoint_validation_function

    guard_checkpoint_loading(guard_config(**overrides))
    assert os.environ['CHECKPOINT_VALIDATION_FUNCTION'] == VALIDATION_FUNCTION
    assert _get_checkpoint_validation_function() is validate_checkpoint


# End to end through build_trainer.


def run_config(data: str, folder, *overrides: str):
    return tiny_config(
        data, str(folder), 'train_dataloader.batch_size=4', 'save_interval=1ba', 'max_duration=2ba', *overrides
    )


@pytest.fixture(scope='module')
def saved_run(synthetic_dataset, tmp_path_factory) -> pathlib.Path:
    """A run folder after 2 batches with a checkpoint per batch; tests work on copies."""
    folder = tmp_path_factory.mktemp('saved') / 'run'
    trainer = build_trainer(run_config(synthetic_dataset, folder))
    assert type(trainer._checkpoint_saver) is ManifestCheckpointSaver
    trainer.fit()
    trainer.close()
    return folder


@pytest.fixture
def run_copy(saved_run, tmp_path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(saved_run, tmp_path / 'run', symlinks=True))


def test_every_saved_checkpoint_has_a_matching_manifest(saved_run):
    checkpoints = saved_run / 'checkpoints'
    assert sorted(os.listdir(checkpoints)) == [
        'ep0-ba1-rank0.pt',
        'ep0-ba1-rank0.pt.sha256',
        CHECKPOINT,
        CHECKPOINT + MANIFEST_SUFFIX,
        'latest-rank0.pt',
    ]
    assert os.readlink(checkpoints / 'latest-rank0.pt') == CHECKPOINT
    for name in ('ep0-ba1-rank0.pt', CHECKPOINT):
        manifest = (checkpoints / (name + MANIFEST_SUFFIX)).read_text()
        assert manifest == signed_manifest((checkpoints / name).read_bytes(), name)


@pytest.mark.parametrize('how', ['load_path', 'autoresume'])
def test_resuming_from_the_run_folder_works(synthetic_dataset, run_copy, how, recwarn):
    how_override = f'load_path={run_copy}/checkpoints/{CHECKPOINT}' if how == 'load_path' else 'autoresume=true'
    trainer = build_trainer(run_config(synthetic_dataset, run_copy, 'max_duration=3ba', how_override))
    assert int(trainer.state.timestamp.batch) == 2
    # The saver changed class before the load, so its state (keyed by class name) was found and restored.
    assert not [w for w in recwarn if 'is not in the state_dict' in str(w.message)]
    saved = trainer._checkpoint_saver.all_saved_checkpoints_to_timestamp  # empty unless restored
    assert sorted(os.path.basename(path) for path in saved) == ['ep0-ba1-rank0.pt', CHECKPOINT]
    trainer.close()


def test_latest_points_at_a_checkpoint_only_once_its_manifest_exists(synthetic_dataset, tmp_path, monkeypatch):
    # So a run killed mid-save autoresumes from a checkpoint that verifies.
    latest = tmp_path / 'checkpoints' / 'latest-rank0.pt'
    seen = []

    def recording_write_manifest(path):
        seen.append((os.path.basename(path), os.readlink(latest) if latest.is_symlink() else None))
        return write_manifest(path)

    monkeypatch.setattr(checkpointing, 'write_manifest', recording_write_manifest)
    trainer = build_trainer(run_config(synthetic_dataset, tmp_path))
    trainer.fit()
    trainer.close()
    assert seen == [('ep0-ba1-rank0.pt', None), (CHECKPOINT, 'ep0-ba1-rank0.pt')]
    assert os.readlink(latest) == CHECKPOINT


def test_rotation_deletes_the_manifest_with_its_checkpoint(synthetic_dataset, tmp_path):
    trainer = build_trainer(run_config(synthetic_dataset, tmp_path, 'save_num_checkpoints_to_keep=1'))
    trainer.fit()
    trainer.close()
    assert sorted(os.listdir(tmp_path / 'checkpoints')) == [CHECKPOINT, CHECKPOINT + MANIFEST_SUFFIX, 'latest-rank0.pt']


def test_an_untrusted_load_path_is_refused_before_anything_is_built(synthetic_dataset, tmp_path, marker):
    evil = plant_payload(tmp_path / 'evil.pt', marker)
    with pytest.raises(
        ValueError, match=rf"load_path='{re.escape(str(evil))}' is outside this run's save_folder.*load_trusted=true"
    ):
        build_trainer(run_config(synthetic_dataset, tmp_path / 'run', f'load_path={evil}'))
    assert not marker.exists()
    assert not (tmp_path / 'run').exists()


def test_a_trusted_load_path_without_manifest_is_refused(synthetic_dataset, tmp_path, marker):
    evil = plant_payload(tmp_path / 'evil.pt', marker)
    with pytest.raises(
        UntrustedCheckpointError, match=f'{re.escape(str(evil))} has no SHA-256 manifest; refusing to unpickle'
    ):
        build_trainer(run_config(synthetic_dataset, tmp_path / 'run', f'load_path={evil}', 'load_trusted=true'))
    assert not marker.exists()


def test_a_trusted_load_path_with_its_manifest_loads(synthetic_dataset, saved_run, tmp_path):
    # Another run's checkpoint, vouched for with load_trusted and still checked against the manifest it came with.
    for name in (CHECKPOINT, CHECKPOINT + MANIFEST_SUFFIX):
        shutil.copy(saved_run / 'checkpoints' / name, tmp_path / name)
    overrides = (f'load_path={tmp_path / CHECKPOINT}', 'load_trusted=true', 'max_duration=3ba')
    trainer = build_trainer(run_config(synthetic_dataset, tmp_path / 'run', *overrides))
    assert int(trainer.state.timestamp.batch) == 2
    trainer.close()


@pytest.mark.parametrize('how', ['load_path', 'autoresume'])
@pytest.mark.parametrize('damage', ['flip a byte', 'plant a payload'])
def test_a_tampered_checkpoint_in_the_run_folder_is_refused(synthetic_dataset, run_copy, marker, how, damage):
    path = run_copy / 'checkpoints' / CHECKPOINT
    if damage == 'flip a byte':
        flip_byte(path)
    else:
        plant_payload(path, marker)  # the original manifest stays
    how_override = f'load_path={path}' if how == 'load_path' else 'autoresume=true'
    with pytest.raises(
        UntrustedCheckpointError,
        match=rf'{re.escape(str(path))} does not match its manifest .*\(tampered or truncated\)',
    ):
        build_trainer(run_config(synthetic_dataset, run_copy, 'max_duration=3ba', how_override))
    assert not marker.exists()


@pytest.mark.remote
@pytest.mark.slow
def test_a_remote_save_folder_gets_manifests_and_refuses_a_swapped_checkpoint(
    synthetic_dataset, s3_server, tmp_path, marker, monkeypatch
):
    import boto3

    monkeypatch.chdir(tmp_path)  # Composer caches a remote `latest` checkpoint under ./s3:/<bucket>/...

    s3 = boto3.client('s3', endpoint_url=s3_server)
    overrides = ('save_folder=s3://test-bucket/run/checkpoints', 'run_name=remote', 'autoresume=true')
    trainer = build_trainer(run_config(synthetic_dataset, tmp_path / 'first', *overrides))
    trainer.fit()
    trainer.close()
    objects = {o['Key'] for o in s3.list_objects_v2(Bucket='test-bucket')['Contents']}
    key = f'run/checkpoints/{CHECKPOINT}'
    assert {key, key + MANIFEST_SUFFIX, 'run/checkpoints/latest-rank0.pt.symlink'} <= objects
    body = s3.get_object(Bucket='test-bucket', Key=key)['Body'].read()
    manifest = s3.get_object(Bucket='test-bucket', Key=key + MANIFEST_SUFFIX)['Body'].read().decode()
    assert manifest == signed_manifest(body, CHECKPOINT)

    # Autoresume downloads the checkpoint to a temporary file and checks it against the fetched manifest.
    resumed = build_trainer(run_config(synthetic_dataset, tmp_path / 'second', *overrides, 'max_duration=3ba'))
    assert int(resumed.state.timestamp.batch) == 2
    resumed.close()

    s3.upload_file(str(plant_payload(tmp_path / 'evil.pt', marker)), 'test-bucket', key)
    (tmp_path / 'elsewhere').mkdir()
    monkeypatch.chdir(tmp_path / 'elsewhere')  # another machine, without the cached copy of the genuine checkpoint
    with pytest.raises(
        UntrustedCheckpointError, match=f'matches none of the SHA-256 manifests .*{re.escape(key)}.sha256'
    ):
        build_trainer(run_config(synthetic_dataset, tmp_path / 'third', *overrides, 'max_duration=3ba'))
    assert not marker.exists()
    # Whoever can write to the bucket can replace the manifest too; its signature needs the key.
    digest = hashlib.sha256((tmp_path / 'evil.pt').read_bytes()).hexdigest()
    s3.put_object(Bucket='test-bucket', Key=key + MANIFEST_SUFFIX, Body=f'{digest}  {CHECKPOINT}\n'.encode())
    with pytest.raises(UntrustedCheckpointError, match=rf's3://test-bucket/{re.escape(key)}\.sha256 is not signed'):
        build_trainer(run_config(synthetic_dataset, tmp_path / 'third', *overrides, 'max_duration=3ba'))
    assert not marker.exists()


def test_pretrained_components_must_be_safetensors(tmp_path, marker):
    # A diffusers folder whose UNet weights are a pickled .bin (here a payload): refused, never unpickled.
    build_tiny_sd().unet.save_pretrained(tmp_path / 'unet', safe_serialization=False)
    plant_payload(tmp_path / 'unet' / 'diffusion_pytorch_model.bin', marker)
    with pytest.raises(OSError, match='no file named diffusion_pytorch_model.safetensors'):
        build_tiny_sd(pretrained_model_name_or_path=str(tmp_path), pretrained_components=['unet'])
    assert not marker.exists()


# A planted checkpoint with a manifest of its own: anyone who can write a checkpoint can write its sha256sum.


def plant_with_manifest(path: pathlib.Path, marker: pathlib.Path) -> pathlib.Path:
    """A payload at ``path`` and the plain ``sha256sum`` manifest that anyone able to write the file can write."""
    plant_payload(path, marker)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    pathlib.Path(f'{path}{MANIFEST_SUFFIX}').write_text(f'{digest}  {path.name}\n')
    return path


def test_a_payload_with_a_manifest_of_its_own_is_refused(tmp_path, marker):
    evil = plant_with_manifest(tmp_path / 'evil.pt', marker)
    sign = rf'python -m diffusion\.checkpointing sign {re.escape(str(evil))}$'
    with pytest.raises(UntrustedCheckpointError, match=rf'{re.escape(str(evil))}\.sha256 is not signed .*{sign}'):
        validate_checkpoint(evil)
    assert not marker.exists()


@pytest.mark.parametrize('how', ['load_path', 'autoresume'])
def test_a_checkpoint_planted_in_the_run_folder_with_its_own_manifest_is_refused(
    synthetic_dataset, run_copy, marker, how
):
    path = plant_with_manifest(run_copy / 'checkpoints' / CHECKPOINT, marker)
    how_override = f'load_path={path}' if how == 'load_path' else 'autoresume=true'
    with pytest.raises(UntrustedCheckpointError, match=rf'{re.escape(str(path))}\.sha256 is not signed'):
        build_trainer(run_config(synthetic_dataset, run_copy, 'max_duration=3ba', how_override))
    assert not marker.exists()


def test_a_signature_copied_from_another_checkpoint_is_refused(tmp_path, marker):
    good = tmp_path / 'good.pt'
    torch.save({'state': {'weight': torch.ones(3)}}, good)
    write_manifest(good)
    evil = plant_with_manifest(tmp_path / 'evil.pt', marker)
    signature = pathlib.Path(f'{good}{MANIFEST_SUFFIX}').read_text().splitlines()[1]
    with open(f'{evil}{MANIFEST_SUFFIX}', 'a') as f:
        f.write(signature + '\n')
    with pytest.raises(UntrustedCheckpointError, match=r'evil\.pt\.sha256 carries a signature that does not verify'):
        validate_checkpoint(evil)
    assert not marker.exists()


# The key: outside every run folder, created once, shared by a team through a file or a secret.


def test_the_default_key_is_created_once_in_the_config_folder_with_mode_0600(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_FILE_ENV)
    monkeypatch.setenv('XDG_CONFIG_HOME', str(tmp_path / 'config'))
    path = tmp_path / 'ck.pt'
    path.write_bytes(b'weights')
    write_manifest(path)  # the first save creates the key
    key_file = tmp_path / 'config' / 'diffusion' / 'checkpoint.key'
    assert default_key_file() == str(key_file)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and len(bytes.fromhex(key_file.read_text())) == 32
    first = key_file.read_text()
    write_manifest(tmp_path / 'ck.pt')
    assert key_file.read_text() == first and validate_checkpoint(path)

    monkeypatch.delenv('XDG_CONFIG_HOME')
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    assert default_key_file() == str(tmp_path / 'home' / '.config' / 'diffusion' / 'checkpoint.key')
    # A machine without the key cannot verify, and loading does not make one up.
    with pytest.raises(
        UntrustedCheckpointError,
        match=r'Cannot check the signature of .*ck\.pt\.sha256: no checkpoint key \(.*/home/\.config/diffusion/'
        rf'checkpoint\.key does not exist and \${KEY_ENV} is not set\); refusing to unpickle',
    ):
        validate_checkpoint(path)
    assert not (tmp_path / 'home').exists()


def test_a_team_shares_the_key_as_a_file_or_a_secret_and_another_key_is_refused(tmp_path, monkeypatch):
    team_key = secrets.token_hex(32)
    monkeypatch.setenv(KEY_ENV, team_key)  # e.g. from a secret manager on the training cluster
    path = tmp_path / 'ck.pt'
    path.write_bytes(b'weights')
    write_manifest(path)
    monkeypatch.delenv(KEY_ENV)  # a workstation with the same key in a file
    (tmp_path / 'team.key').write_text(team_key + '\n')
    (tmp_path / 'team.key').chmod(0o600)
    monkeypatch.setenv(KEY_FILE_ENV, str(tmp_path / 'team.key'))
    assert validate_checkpoint(path)

    monkeypatch.setenv(KEY_ENV, secrets.token_hex(32))  # a rotated key, or another team's
    with pytest.raises(
        UntrustedCheckpointError,
        match=rf'ck\.pt\.sha256 is signed with another key \(id [0-9a-f]{{16}}; the key in \${KEY_ENV} has id '
        rf'[0-9a-f]{{16}}\); refusing to unpickle .*{SIGN_COMMAND} {re.escape(str(path))}$',
    ):
        validate_checkpoint(path)
    monkeypatch.setenv(KEY_ENV, 'c0ffee')
    with pytest.raises(CheckpointKeyError, match=rf'\${KEY_ENV} is not a checkpoint key: expected at least 16 bytes'):
        write_manifest(path)


def test_ranks_with_different_keys_are_refused_before_training(monkeypatch):
    from composer.utils import dist

    monkeypatch.setattr(dist, 'all_gather_object', lambda obj: [obj, '0123456789abcdef'])
    with pytest.raises(CheckpointKeyError, match=r'rank 1: 0123456789abcdef\).*same key'):
        checkpointing._check_same_key_on_every_rank()


# python -m diffusion.checkpointing sign / verify / key


def test_signing_vouches_for_a_checked_checkpoint_from_before_signatures(tmp_path):
    path = tmp_path / 'old.pt'
    torch.save({'state': {'weight': torch.ones(3)}}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    pathlib.Path(f'{path}{MANIFEST_SUFFIX}').write_text(f'{digest}  old.pt\n')  # as written before signatures
    with pytest.raises(UntrustedCheckpointError, match=rf'is not signed .*{SIGN_COMMAND} {re.escape(str(path))}$'):
        validate_checkpoint(path)
    assert checkpointing.main(['verify', str(path)]) == 1
    command = [sys.executable, '-m', 'diffusion.checkpointing']
    signed = subprocess.run([*command, 'sign', str(path)], env=subprocess_env(), cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert signed.returncode == 0, signed.stderr
    assert f'signed {path} (sha256 {digest}) with key ' in signed.stderr
    assert 'sign only files you made or checked' in signed.stderr
    assert validate_checkpoint(path) and checkpointing.main(['verify', str(path)]) == 0


def test_signing_refuses_a_file_that_changed_since_it_was_hashed(tmp_path, marker, capsys):
    path = tmp_path / 'ck.pt'
    torch.save({'state': {'weight': torch.ones(3)}}, path)
    write_manifest(path)
    plant_payload(path, marker)  # swapped after the save
    assert checkpointing.main(['sign', str(path)]) == 1
    assert 'ck.pt differs from its manifest' in capsys.readouterr().err
    with pytest.raises(UntrustedCheckpointError, match='does not match its manifest'):
        validate_checkpoint(path)
    assert checkpointing.main(['sign', '--force', str(path)]) == 0  # the user has checked the new content
    assert validate_checkpoint(path) and not marker.exists()


def test_signing_a_sharded_checkpoint_folder_signs_each_file(tmp_path, capsys):
    folder = tmp_path / 'ep0-ba2'
    folder.mkdir()
    for name in ('.metadata', '__0_0.distcp', '__1_0.distcp'):
        (folder / name).write_bytes(os.urandom(100))
    assert checkpointing.main(['sign', str(folder)]) == 0
    assert sorted(os.listdir(folder)) == sorted(
        [n for name in ('.metadata', '__0_0.distcp', '__1_0.distcp') for n in (name, name + MANIFEST_SUFFIX)]
    )
    assert checkpointing.main(['verify', str(folder)]) == 0
    assert checkpointing.main(['key']) == 0
    assert f'{os.environ[KEY_FILE_ENV]}: key id ' in capsys.readouterr().out


# The model's weights must all be in the checkpoint, and nothing else.


def damage_model_state(path: pathlib.Path, damage: str) -> list[str]:
    """Rewrite our own checkpoint at ``path`` with its model state emptied, cut or extended, and vouch for it; returns
    the names of the weights it held."""
    contents = torch.load(path, map_location='cpu', weights_only=False)
    model = contents['state']['model']
    names = sorted(model)
    if damage == 'empty':
        contents['state']['model'] = {}
    elif damage == 'partial':
        contents['state']['model'] = {k: v for k, v in model.items() if not k.startswith('unet.')}
    else:
        model['unet.extra.weight'] = torch.zeros(1)
        model['unet.extra.bias'] = torch.zeros(1)
    torch.save(contents, path)
    write_manifest(path)
    return names


@pytest.mark.parametrize(
    'damage, how',
    [('empty', 'load_path'), ('partial', 'load_path'), ('unexpected', 'load_path'), ('empty', 'autoresume'),
     ('partial', 'load_weights_only')],
)  # fmt: skip
def test_a_checkpoint_without_the_models_weights_is_refused(synthetic_dataset, run_copy, damage, how):
    # Composer resumes with strict=False and torch skips an empty model state: both started from random weights.
    path = run_copy / 'checkpoints' / CHECKPOINT
    names = damage_model_state(path, damage)
    unet = [name for name in names if name.startswith('unet.')]
    # Weights only starts a new run (at batch 0), which a folder holding the old run's checkpoints refuses: it saves
    # elsewhere and loads the old run's checkpoint as trusted.
    overrides = {'load_path': [f'load_path={path}'], 'autoresume': ['autoresume=true'],
                 'load_weights_only': [f'load_path={path}', 'load_weights_only=true', 'load_trusted=true',
                                       f'save_folder={run_copy}/weights_only']}[how]  # fmt: skip
    expected = {
        'empty': f'{len(names)} missing ({", ".join(names[:3])}, ...), 0 unexpected.',
        'partial': f'{len(unet)} missing ({", ".join(unet[:3])}, ...), 0 unexpected.',
        'unexpected': '0 missing, 2 unexpected (unet.extra.bias, unet.extra.weight).',
    }[damage]
    with pytest.raises(ValueError, match=f"{re.escape(str(path))} does not hold the model's weights: ") as error:
        build_trainer(run_config(synthetic_dataset, run_copy, 'max_duration=3ba', *overrides))
    assert expected in str(error.value)
    assert 'load_strict_model_weights=false' in str(error.value)


def test_load_strict_model_weights_false_loads_a_partial_checkpoint_with_a_warning(synthetic_dataset, run_copy, caplog):
    path = run_copy / 'checkpoints' / CHECKPOINT
    damage_model_state(path, 'partial')
    overrides = (f'load_path={path}', 'load_strict_model_weights=false', 'max_duration=3ba')
    trainer = build_trainer(run_config(synthetic_dataset, run_copy, *overrides))
    assert int(trainer.state.timestamp.batch) == 2
    assert re.search(r"does not hold the model's weights: \d+ missing \(unet\.", caplog.text)
    trainer.close()
