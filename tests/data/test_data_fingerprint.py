"""A checkpoint records which data it trained on, and a resume on other data is refused unless allowed."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from streaming import MDSWriter

from diffusion.data.fingerprint import fingerprint_local, fingerprint_mismatches
from diffusion.data.image_caption import StreamingImageCaptionDataset, build_image_caption_dataloader
from diffusion.data.latents import StreamingLatentDataset
from diffusion.data.synthetic import write_synthetic_dataset
from tests.conftest import COMPOSER_LAUNCHER, REPO_ROOT, TEST_MODEL_OVERRIDES, TINY_YAML, subprocess_env, tiny_config


def synthetic(out: str, num_samples: int) -> str:
    """``num_samples`` 16px samples in shards of about 16 samples."""
    return write_synthetic_dataset(
        out, num_samples=num_samples, image_size=16, size_limit=8_000, progress=False, overwrite=True
    )


def drop_last_shard(out: str) -> int:
    """Remove the last shard from ``out`` and its index, as a rewrite of the dataset without it would; returns the
    samples left."""
    with open(os.path.join(out, 'index.json')) as f:
        index = json.load(f)
    last = index['shards'].pop()
    os.remove(os.path.join(out, last['raw_data']['basename']))
    with open(os.path.join(out, 'index.json'), 'w') as f:
        json.dump(index, f)
    return sum(shard['samples'] for shard in index['shards'])


def test_the_fingerprint_is_the_index_digest_and_the_sample_count(tmp_path):
    out = synthetic(str(tmp_path / 'data'), 40)
    with open(os.path.join(out, 'index.json'), 'rb') as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    entry = fingerprint_local(out)
    assert entry == {'location': out, 'index_sha256': digest, 'num_samples': 40}
    assert StreamingImageCaptionDataset(local=out).fingerprint() == [entry]
    assert fingerprint_mismatches([entry], [{**entry, 'location': '/elsewhere'}]) == []  # the same data, moved

    left = drop_last_shard(out)
    assert left < 40
    (difference,) = fingerprint_mismatches([entry], [fingerprint_local(out)])
    assert difference.startswith(f'stream 0 ({out}): 40 samples, index.json sha256 {digest[:12]} saved vs {left} ')


def composer(*overrides: str) -> subprocess.CompletedProcess:
    command = [*COMPOSER_LAUNCHER, '-n', '2', 'train.py', TINY_YAML, *TEST_MODEL_OVERRIDES, *overrides]
    return subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.world_size(2)
def test_a_resume_on_changed_data_is_refused_naming_the_stream_and_both_counts(tmp_path):
    data, run = synthetic(str(tmp_path / 'data'), 128), tmp_path / 'run'
    common = (f'train_dataloader.remote={data}', 'train_dataloader.resolution=16', 'train_dataloader.batch_size=8',
              f'run_folder={run}', 'save_interval=2ba', 'progress_bar=false')  # fmt: skip
    first = composer(*common, 'max_duration=2ba')
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    synthetic(data, 208)  # 80 samples added
    resume = (*common, 'max_duration=4ba', f'load_path={run}/checkpoints/ep0-ba2-rank0.pt')
    refused = composer(*resume)
    assert refused.returncode != 0
    output = refused.stdout + refused.stderr
    assert f'stream 0 ({data}): 128 samples, index.json sha256' in output
    assert 'saved vs 208 samples' in output
    assert 'train_dataloader.allow_changed_data' in output
    assert not (run / 'checkpoints' / 'ep0-ba4-rank0.pt').exists()

    accepted = composer(*resume, '+train_dataloader.allow_changed_data=true')
    assert accepted.returncode == 0, accepted.stdout[-3000:] + accepted.stderr[-3000:]
    assert (run / 'checkpoints' / 'ep0-ba4-rank0.pt').exists()


@pytest.mark.slow
def test_a_resume_after_the_last_shard_was_removed_is_refused(tmp_path):
    from diffusion.builders import build_trainer

    data = synthetic(str(tmp_path / 'data'), 64)
    common = ('train_dataloader.batch_size=8', 'save_interval=2ba')
    build_trainer(tiny_config(data, str(tmp_path / 'run'), 'max_duration=2ba', *common)).fit()
    left = drop_last_shard(data)
    checkpoint = f'{tmp_path}/run/checkpoints/ep0-ba2-rank0.pt'
    with pytest.raises(ValueError, match=rf'stream 0 \({data}\): 64 samples, .* saved vs {left} samples'):
        build_trainer(tiny_config(data, str(tmp_path / 'run'), 'max_duration=4ba', f'load_path={checkpoint}', *common))
    allowed = build_trainer(
        tiny_config(data, str(tmp_path / 'run'), 'max_duration=4ba', f'load_path={checkpoint}',
                    '+train_dataloader.allow_changed_data=true', *common)
    )  # fmt: skip
    assert int(allowed.state.timestamp.batch) == 2


@pytest.mark.slow
def test_a_checkpoint_without_a_fingerprint_resumes_with_a_warning(tmp_path, caplog):
    from diffusion.builders import build_trainer
    from diffusion.checkpointing import write_manifest

    data = synthetic(str(tmp_path / 'data'), 64)
    common = ('train_dataloader.batch_size=8', 'save_interval=2ba')
    build_trainer(tiny_config(data, str(tmp_path / 'run'), 'max_duration=2ba', *common)).fit()
    checkpoint = f'{tmp_path}/run/checkpoints/ep0-ba2-rank0.pt'
    # As a checkpoint written before fingerprints were recorded.
    saved = torch.load(checkpoint, map_location='cpu', weights_only=False)
    assert saved['state']['dataset_state']['train'].pop('data_fingerprint')
    torch.save(saved, checkpoint)
    write_manifest(checkpoint)
    with caplog.at_level(logging.WARNING, logger='diffusion.data.faults'):
        resumed = build_trainer(
            tiny_config(data, str(tmp_path / 'run'), 'max_duration=4ba', f'load_path={checkpoint}', *common)
        )
    assert int(resumed.state.timestamp.batch) == 2
    assert 'records no data fingerprint' in caplog.text


def test_aspect_buckets_and_latents_check_the_fingerprint_too(tmp_path, caplog):
    data = synthetic(str(tmp_path / 'images'), 24)
    bucketed = build_image_caption_dataloader(data, batch_size=4, resolution=16, aspect_buckets=[[16, 16]])
    state = bucketed.dataset.state_dict(8, True)
    assert state['data_fingerprint'] == [fingerprint_local(data)]
    drop_last_shard(data)
    changed = build_image_caption_dataloader(data, batch_size=4, resolution=16, aspect_buckets=[[16, 16]])
    with pytest.raises(ValueError, match=rf'stream 0 \({data}\): 24 samples, .* saved vs \d+ samples'):
        changed.dataset.load_state_dict(state)
    allowed = build_image_caption_dataloader(
        data, batch_size=4, resolution=16, aspect_buckets=[[16, 16]], allow_changed_data=True
    )
    with caplog.at_level(logging.WARNING):
        allowed.dataset.load_state_dict(state)  # mid-epoch of another plan: the epoch starts again
    assert 'allow_changed_data' in caplog.text

    latents = write_latents(str(tmp_path / 'latents'), 6)
    state = StreamingLatentDataset(local=latents, batch_size=2).state_dict(0, True)
    write_latents(latents, 8, overwrite=True)
    with pytest.raises(ValueError, match=r'6 samples, .* saved vs 8 samples'):
        StreamingLatentDataset(local=latents, batch_size=2).load_state_dict(state)


def write_latents(out: str, count: int, overwrite: bool = False) -> str:
    if overwrite:
        shutil.rmtree(out)
    with MDSWriter(out=out, columns={'image_latents': 'ndarray', 'text_embeds': 'ndarray'}) as writer:
        for _ in range(count):
            writer.write(
                {'image_latents': np.zeros((4, 2, 2), np.float32), 'text_embeds': np.zeros((3, 8), np.float32)}
            )
    return out
