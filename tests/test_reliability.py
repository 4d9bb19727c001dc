"""Crash and resume: a run SIGKILLed mid-training and restarted with autoresume ends bit-identical to one that
was never interrupted (weights, EMA, optimizer state, LR schedule, data order), with 1 and 2 processes."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch

from tests.conftest import COMPOSER_LAUNCHER, REPO_ROOT, TEST_MODEL_OVERRIDES, TINY_YAML, run_composer, subprocess_env

MAX_BATCHES = 12  # 128 samples in batches of 16: the run crosses an epoch boundary at batch 8


def overrides(data: str, folder: str) -> list[str]:
    return [
        *TEST_MODEL_OVERRIDES,
        f'train_dataloader.remote={data}',
        'train_dataloader.resolution=16',
        'train_dataloader.batch_size=16',
        f'run_folder={folder}',
        'run_name=crash-test',
        f'max_duration={MAX_BATCHES}ba',
        'save_interval=1ba',
        # Overwrite: a run killed between writing a checkpoint and linking it as latest leaves a file that the
        # resumed run must be allowed to replace when it reaches that batch again.
        'save_overwrite=true',
        'autoresume=true',
        'deterministic_mode=true',
        'progress_bar=false',
        '+algorithms.ema={half_life: 2ba, ema_start: 2ba}',
        '+scheduler={name: cosine_with_warmup, t_warmup: 3ba, alpha_f: 0.1}',
        'optimizer.lr=2e-3',
    ]


def command(processes: int, args: list[str]) -> list[str]:
    return [*COMPOSER_LAUNCHER, '-n', str(processes), 'train.py', TINY_YAML, *args]


def kill_midway(processes: int, args: list[str], checkpoints: str, after_batch: int, log: str) -> None:
    """Start the run and SIGKILL the launcher and its ranks once the checkpoint of ``after_batch`` exists.

    The run's output goes to ``log``, whose end is in the failure message if the run ends by itself.
    """
    env = subprocess_env()
    with open(log, 'w') as out:
        process = subprocess.Popen(
            command(processes, args), cwd=REPO_ROOT, env=env, start_new_session=True, stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        marker = os.path.join(checkpoints, f'ep0-ba{after_batch}-rank0.pt')
        deadline = time.time() + 300
        while time.time() < deadline and process.poll() is None and not os.path.exists(marker):
            time.sleep(0.01)
        if process.poll() is not None:
            with open(log) as f:
                tail = f.read()[-4000:]
            raise AssertionError(f'the run ended (rc {process.returncode}) before it could be killed:\n{tail}')
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def final_state(folder: str) -> dict:
    # Our own checkpoint, written by this test's run: trusted.
    path = os.path.join(folder, 'checkpoints', f'ep1-ba{MAX_BATCHES}-rank0.pt')
    return torch.load(path, map_location='cpu', weights_only=False)['state']


def assert_same(a, b, where: str = '') -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            # Composer stores each algorithm's repr (with a memory address) and wall-clock times: not run state.
            if key != 'repr' and not str(key).endswith('_wct'):
                assert_same(a[key], b[key], f'{where}.{key}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f'{where}[{index}]')
    else:
        assert a == b, where


def ledger(folder: str, rank: int) -> dict[int, list[int]]:
    """Samples per batch; for a batch seen twice (before and after the crash) the later entry counts."""
    import json

    with open(os.path.join(folder, 'ledger', f'rank{rank}.jsonl')) as f:
        return {record['batch']: record['samples'] for record in map(json.loads, f)}


@pytest.mark.slow
@pytest.mark.parametrize('processes', [1, pytest.param(2, marks=pytest.mark.world_size(2))])
def test_a_sigkilled_run_resumes_bit_exactly(synthetic_dataset, tmp_path, processes):
    reference, crashed = str(tmp_path / 'reference'), str(tmp_path / 'crashed')
    run_composer(TINY_YAML, *overrides(synthetic_dataset, reference), processes=processes)

    args = overrides(synthetic_dataset, crashed)
    kill_midway(processes, args, os.path.join(crashed, 'checkpoints'), 4, str(tmp_path / 'killed_run.log'))
    killed_at = max(int(n.split('-ba')[1].split('-')[0]) for n in os.listdir(os.path.join(crashed, 'checkpoints'))
                    if n.endswith('-rank0.pt') and not n.startswith('latest'))  # fmt: skip
    assert 4 <= killed_at < MAX_BATCHES
    run_composer(TINY_YAML, *args, processes=processes)  # the same command again: autoresume takes over

    expected, resumed = final_state(reference), final_state(crashed)
    assert_same(expected['model'], resumed['model'], 'model')
    assert_same(expected['optimizers'], resumed['optimizers'], 'optimizers')
    assert_same(expected['schedulers'], resumed['schedulers'], 'schedulers')
    assert any(name == 'ShardedEMA' for name, _ in expected['algorithms'])
    assert_same(expected['algorithms'], resumed['algorithms'], 'algorithms')  # EMA weights and flags
    assert_same(expected['timestamp'], resumed['timestamp'], 'timestamp')
    for rank in range(processes):
        assert ledger(crashed, rank) == ledger(reference, rank)


@pytest.mark.slow
@pytest.mark.remote
def test_checkpoints_on_s3_resume_and_ignore_a_half_written_one(s3_server, synthetic_dataset, tmp_path, monkeypatch):
    import boto3

    monkeypatch.chdir(tmp_path)  # Composer caches a remote autoresume checkpoint under ./s3:/...

    from diffusion.builders import build_trainer
    from tests.conftest import tiny_config

    common = ('train_dataloader.batch_size=16', 'save_folder=s3://test-bucket/runs/s3run', 'save_interval=1ba',
              'run_name=s3run', 'autoresume=true', 'save_overwrite=true', 'save_num_checkpoints_to_keep=1')  # fmt: skip
    build_trainer(tiny_config(synthetic_dataset, str(tmp_path / 'first'), 'max_duration=2ba', *common)).fit()
    s3 = boto3.client('s3', endpoint_url=s3_server)
    keys = {o['Key'] for o in s3.list_objects_v2(Bucket='test-bucket', Prefix='runs/s3run/')['Contents']}
    assert {'runs/s3run/ep0-ba1-rank0.pt', 'runs/s3run/ep0-ba2-rank0.pt', 'runs/s3run/latest-rank0.pt.symlink'} <= keys

    # An upload cut short: a newer, truncated checkpoint object that the latest symlink never pointed to.
    s3.put_object(Bucket='test-bucket', Key='runs/s3run/ep0-ba3-rank0.pt', Body=b'PK\x03\x04 cut short')
    resumed = build_trainer(tiny_config(synthetic_dataset, str(tmp_path / 'second'), 'max_duration=4ba', *common))
    assert int(resumed.state.timestamp.batch) == 2  # from the last complete checkpoint
    resumed.fit()
    assert int(resumed.state.timestamp.batch) == 4

    # An explicit load_path on the object store, from another run: marked trusted, and checked against its manifest.
    loaded = build_trainer(tiny_config(
        synthetic_dataset, str(tmp_path / 'third'), 'max_duration=4ba', 'train_dataloader.batch_size=16',
        'load_path=s3://test-bucket/runs/s3run/ep0-ba4-rank0.pt', 'load_trusted=true', 'save_folder=null',
    ))  # fmt: skip
    assert int(loaded.state.timestamp.batch) == 4
