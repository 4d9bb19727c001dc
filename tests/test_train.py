"""End-to-end training through the config path: learning, resumption and multi-process runs."""

import json
import os
import threading

import pytest
import torch
from composer.core import Callback

from diffusion.builders import build_trainer
from diffusion.config import ConfigError
from diffusion.train import main
from tests.conftest import TEST_MODEL_OVERRIDES, TINY_YAML, run_composer, tiny_config


class LossRecorder(Callback):
    def __init__(self):
        self.losses = []

    def after_train_batch(self, state, logger):
        self.losses.append(float(state.loss))


def read_ledger(folder, rank=0):
    with open(os.path.join(folder, 'ledger', f'rank{rank}.jsonl')) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_loss_decreases_on_synthetic_data(synthetic_dataset, tmp_path):
    cfg = tiny_config(
        synthetic_dataset,
        str(tmp_path),
        'max_duration=40ba',
        'optimizer.lr=2e-3',
        'save_folder=null',
        'train_dataloader.batch_size=16',
    )
    trainer = build_trainer(cfg)
    recorder = LossRecorder()
    trainer.state.callbacks.append(recorder)
    trainer.fit()
    first, last = recorder.losses[:8], recorder.losses[-8:]
    assert len(recorder.losses) == 40
    assert sum(last) / 8 < 0.85 * sum(first) / 8, recorder.losses


def unet_state(trainer):
    return {k: v.clone() for k, v in trainer.state.model.unet.state_dict().items()}


@pytest.mark.slow
def test_resume_from_checkpoint_continues_at_saved_batch(synthetic_dataset, tmp_path):
    # 128 samples in batches of 16: batch 3 is in the middle of the first epoch.
    common = ('train_dataloader.batch_size=16', 'save_interval=3ba')  # shuffled (the default)
    full = build_trainer(tiny_config(synthetic_dataset, str(tmp_path / 'full'), 'max_duration=6ba', *common))
    full.fit()

    first = build_trainer(tiny_config(synthetic_dataset, str(tmp_path / 'part'), 'max_duration=3ba', *common))
    first.fit()
    checkpoint = tmp_path / 'part' / 'checkpoints' / 'ep0-ba3-rank0.pt'
    assert checkpoint.exists()

    # Another run's checkpoint: outside this run's save_folder, so it must be marked trusted (and match its manifest).
    resumed = build_trainer(
        tiny_config(
            synthetic_dataset,
            str(tmp_path / 'resumed'),
            'max_duration=6ba',
            f'load_path={checkpoint}',
            'load_trusted=true',
            *common,
        )
    )
    assert int(resumed.state.timestamp.batch) == 3
    # Same weights and optimizer state as when the first run stopped.
    for key, value in unet_state(first).items():
        assert torch.equal(unet_state(resumed)[key], value), key
    saved = first.state.optimizers[0].state_dict()['state']
    loaded = resumed.state.optimizers[0].state_dict()['state']
    assert saved.keys() == loaded.keys() and len(saved) > 0
    for index in saved:
        for name in ('exp_avg', 'exp_avg_sq', 'step'):
            assert torch.equal(saved[index][name], loaded[index][name]), (index, name)
    resumed.fit()
    assert int(resumed.state.timestamp.batch) == 6

    # Same data position: the resumed run trains on exactly the samples of batches 3-5 of the full run.
    full_ledger = read_ledger(tmp_path / 'full')
    resumed_ledger = read_ledger(tmp_path / 'resumed')
    assert [r['batch'] for r in resumed_ledger] == [3, 4, 5]
    assert [r['samples'] for r in resumed_ledger] == [r['samples'] for r in full_ledger[3:]]
    # Same RNG stream (timesteps, noise, caption dropout): the weights end bit-identical to the uninterrupted run.
    for key, value in unet_state(full).items():
        assert torch.equal(unet_state(resumed)[key], value), key


@pytest.mark.slow
def test_autoresume_picks_up_the_latest_checkpoint(synthetic_dataset, tmp_path):
    common = (
        'train_dataloader.batch_size=16',
        'save_interval=2ba',
        'autoresume=true',
        'run_name=auto',
        'save_overwrite=true',
    )
    build_trainer(tiny_config(synthetic_dataset, str(tmp_path), 'max_duration=2ba', *common)).fit()
    again = build_trainer(tiny_config(synthetic_dataset, str(tmp_path), 'max_duration=4ba', *common))
    assert int(again.state.timestamp.batch) == 2
    again.fit()
    assert [r['batch'] for r in read_ledger(tmp_path)] == [0, 1, 2, 3]


def composer_run(*overrides: str):
    """``composer -n 2 train.py yamls/tiny_sd_cpu.yaml`` at test size."""
    return run_composer(
        TINY_YAML,
        *TEST_MODEL_OVERRIDES,
        'train_dataloader.resolution=16',
        'progress_bar=false',
        *overrides,
        processes=2,
    )


@pytest.mark.slow
def test_two_process_run_sees_disjoint_samples(synthetic_dataset, tmp_path):
    composer_run(
        f'train_dataloader.remote={synthetic_dataset}',
        f'run_folder={tmp_path}',
        'max_duration=4ba',
        'train_dataloader.batch_size=8',
        'save_interval=4ba',
        # Under DDP the callbacks must reach the model inside the wrapper.
        f'+callbacks.save_pretrained={{folder:{tmp_path}/pretrained,components:[unet]}}',
    )
    rank0, rank1 = read_ledger(tmp_path, 0), read_ledger(tmp_path, 1)
    assert [r['batch'] for r in rank0] == [r['batch'] for r in rank1] == [0, 1, 2, 3]
    seen0 = [i for r in rank0 for i in r['samples']]
    seen1 = [i for r in rank1 for i in r['samples']]
    assert len(seen0) == len(seen1) == 16  # 4 samples per rank per batch
    assert not set(seen0) & set(seen1)
    assert len(set(seen0) | set(seen1)) == 32
    assert (tmp_path / 'checkpoints' / 'ep0-ba4-rank0.pt').exists()
    assert (tmp_path / 'pretrained' / 'unet' / 'diffusion_pytorch_model.safetensors').exists()


@pytest.mark.slow
def test_two_process_resume_is_bit_exact(synthetic_dataset, tmp_path):
    from safetensors.torch import load_file

    def run(folder, *overrides):
        composer_run(
            f'train_dataloader.remote={synthetic_dataset}',
            f'run_folder={tmp_path / folder}',
            'train_dataloader.batch_size=8',
            'save_interval=2ba',
            f'+callbacks.save_pretrained={{folder:{tmp_path / folder}/pretrained,components:[unet]}}',
            *overrides,
        )
        return load_file(tmp_path / folder / 'pretrained' / 'unet' / 'diffusion_pytorch_model.safetensors')

    full = run('full', 'max_duration=4ba')
    run('part', 'max_duration=2ba')
    resumed = run(
        'resumed', 'max_duration=4ba', f'load_path={tmp_path}/part/checkpoints/ep0-ba2-rank0.pt', 'load_trusted=true'
    )
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    for rank in (0, 1):
        assert [r['samples'] for r in read_ledger(tmp_path / 'resumed', rank)] == [
            r['samples'] for r in read_ledger(tmp_path / 'full', rank)[2:]
        ]


@pytest.mark.slow
def test_a_new_run_over_another_runs_checkpoints_is_refused_and_a_resume_is_not(synthetic_dataset, tmp_path, capsys):
    # README's first two Train commands in a row: the second started from scratch in the first one's folder, so
    # checkpoints of both runs mixed, `latest` pointed at the older run's batch and the ledgers merged.
    common = ('train_dataloader.batch_size=16', 'save_interval=2ba')
    build_trainer(tiny_config(synthetic_dataset, str(tmp_path), 'max_duration=2ba', *common)).fit()
    checkpoint = tmp_path / 'checkpoints' / 'ep0-ba2-rank0.pt'
    config = (tmp_path / 'config.yaml').read_text()

    message = (
        rf'^save_folder {tmp_path}/checkpoints holds the checkpoints of another run \(latest: ep0-ba2-rank0.pt\), '
        r'and this start is no resume of it: .* Start the new run in another folder \(a new run_folder or '
        r'save_folder\), or continue that run with autoresume=true\.$'
    )
    for start in ([], [f'load_path={checkpoint}', 'load_weights_only=true']):  # weights only: a new run too
        with pytest.raises(ConfigError, match=message):
            build_trainer(tiny_config(synthetic_dataset, str(tmp_path), 'max_duration=4ba', *common, *start))
    assert (tmp_path / 'config.yaml').read_text() == config  # the refused start wrote nothing
    with pytest.raises(SystemExit):
        main(
            [TINY_YAML, *TEST_MODEL_OVERRIDES, f'train_dataloader.remote={synthetic_dataset}', f'run_folder={tmp_path}']
        )
    error = capsys.readouterr().err
    assert error.count('\n') == 1 and error.startswith(f'error: save_folder {tmp_path}/checkpoints holds'), error

    # Continuing the run is a resume: autoresume, or a load_path in its own folder.
    for resume in ('autoresume=true', f'load_path={checkpoint}'):
        resumed = build_trainer(tiny_config(synthetic_dataset, str(tmp_path), 'max_duration=4ba', *common, resume))
        assert int(resumed.state.timestamp.batch) == 2
        resumed.close()
    # And a new run_folder is a new run's.
    build_trainer(tiny_config(synthetic_dataset, str(tmp_path / 'other'), 'max_duration=4ba', *common)).close()


@pytest.mark.slow
def test_a_new_run_over_a_buckets_checkpoints_is_refused(s3_server, synthetic_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Composer caches a remote autoresume checkpoint under ./s3:/...
    common = ('train_dataloader.batch_size=16', 'save_interval=2ba', 'save_folder=s3://test-bucket/runs/a')
    build_trainer(tiny_config(synthetic_dataset, str(tmp_path / 'first'), 'max_duration=2ba', *common)).fit()
    with pytest.raises(ConfigError, match=r'^save_folder s3://test-bucket/runs/a holds the checkpoints of another run'):
        build_trainer(tiny_config(synthetic_dataset, str(tmp_path / 'second'), 'max_duration=4ba', *common))
    resumed = build_trainer(
        tiny_config(synthetic_dataset, str(tmp_path / 'third'), 'max_duration=4ba', 'autoresume=true', *common)
    )
    assert int(resumed.state.timestamp.batch) == 2


def test_a_run_ends_saying_where_its_checkpoints_are(synthetic_dataset, tmp_path, capsys):
    common = [TINY_YAML, *TEST_MODEL_OVERRIDES, f'train_dataloader.remote={synthetic_dataset}',
              'train_dataloader.resolution=16', 'train_dataloader.batch_size=8', 'max_duration=2ba',
              'save_interval=1ba', 'progress_bar=false']  # fmt: skip
    main([*common, f'run_folder={tmp_path}'])
    folder = tmp_path / 'checkpoints'
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == (
        f'Checkpoints: {folder} (latest: {folder}/ep0-ba2-rank0.pt; resume with autoresume=true or '
        f'load_path={folder}/ep0-ba2-rank0.pt).'
    )
    assert os.path.realpath(folder / 'latest-rank0.pt') == str(folder / 'ep0-ba2-rank0.pt')
    main([*common, f'run_folder={tmp_path / "unsaved"}', 'save_folder=null'])
    assert capsys.readouterr().out.splitlines()[-1] == 'No checkpoints were saved: save_folder is not set.'


def test_train_pys_cpu_probe_runs_once_in_the_background_and_the_trainer_reuses_it(
    synthetic_dataset, tmp_path, monkeypatch
):
    import cpuinfo
    from composer.utils import collect_env

    import diffusion.utils

    calls, main_called = [], threading.Event()

    def cpu_info():  # py-cpuinfo's probe, held until the Trainer would have asked (or 2 s)
        calls.append(threading.current_thread().name)
        if threading.current_thread() is threading.main_thread():
            main_called.set()
        else:
            main_called.wait(2)
        return {'brand_raw': 'Probe Test CPU'}

    monkeypatch.setattr(cpuinfo, 'get_cpu_info', cpu_info)
    monkeypatch.setattr(diffusion.utils, '_ENV_PROBE', None)
    cached_cpu_model = collect_env.get_cpu_model
    cached_cpu_model.cache_clear()
    try:
        diffusion.utils.start_composer_env_probe()
        diffusion.utils.start_composer_env_probe()  # one probe a process
        build_trainer(tiny_config(synthetic_dataset, str(tmp_path), 'max_duration=1ba', 'save_folder=null'))
        # The Trainer waited for the probe instead of running py-cpuinfo again on the main thread.
        assert calls == ['composer-env-probe']
        assert collect_env.get_cpu_model() == 'Probe Test CPU'
        assert collect_env.get_cpu_model.cache_info().misses == 1
        monkeypatch.setattr(diffusion.utils, '_ENV_PROBE', None)
        diffusion.utils.start_composer_env_probe()  # the answer is known: nothing to start
        assert diffusion.utils._ENV_PROBE is None and calls == ['composer-env-probe']
        # A Composer whose get_cpu_model keeps no answer would run py-cpuinfo again in the Trainer: no probe then.
        monkeypatch.setattr(collect_env, 'get_cpu_model', lambda: cpu_info()['brand_raw'])
        diffusion.utils.start_composer_env_probe()
        assert diffusion.utils._ENV_PROBE is None and calls == ['composer-env-probe']
    finally:
        cached_cpu_model.cache_clear()  # the other tests' Trainers ask the real py-cpuinfo
