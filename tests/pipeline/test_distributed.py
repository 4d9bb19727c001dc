"""Ranks and crashes: the same dataset from 1 or 2 processes, and a killed run that resumes without duplicates."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from diffusion.pipeline.__main__ import main
from diffusion.pipeline.captioners import save_tiny_blip2
from tests.conftest import COMPOSER_LAUNCHER, REPO_ROOT, subprocess_env
from tests.pipeline.conftest import commoncatalog_row, jpeg, photo, write_commoncatalog
from tests.pipeline.test_pipeline import read_dataset


def pipeline_command(*args: str, processes: int = 0) -> list[str]:
    """``python -m diffusion.pipeline`` or, with ``processes``, ``composer -n <processes> -m diffusion.pipeline``."""
    if processes:
        return [*COMPOSER_LAUNCHER, '-n', str(processes), '-m', 'diffusion.pipeline', *args, '--no-progress']
    return [sys.executable, '-m', 'diffusion.pipeline', *args, '--no-progress']


def run(command: list[str]) -> subprocess.CompletedProcess:
    env = subprocess_env(HF_HUB_OFFLINE='1')
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.world_size(2)
def test_one_and_two_processes_write_the_same_dataset_and_captions(commoncatalog_parquet, tmp_path):
    blip2 = save_tiny_blip2(str(tmp_path / 'tiny-blip2'))
    outputs = {}
    for processes in (1, 2):
        ingested, captioned = str(tmp_path / f'ingested-{processes}'), str(tmp_path / f'captioned-{processes}')
        ingest_args = ['ingest', '--source', 'commoncatalog', '--input', commoncatalog_parquet, '--out', ingested,
                       '--unit-size', '5']  # fmt: skip
        caption_args = ['caption', '--input', ingested, '--out', captioned, '--model', blip2, '--max-new-tokens', '8']
        if processes == 1:
            main([*ingest_args, '--no-progress'])
            main([*caption_args, '--no-progress'])
        else:
            run(pipeline_command(*ingest_args, processes=2))
            run(pipeline_command(*caption_args, processes=2))
        outputs[processes] = [
            (s['key'], s['caption'], s['original_caption'], s['image'])
            for s in read_dataset(captioned, str(tmp_path / f'cache-{processes}'))
        ]
    assert len(outputs[1]) == 21
    assert outputs[1] == outputs[2]
    # The captioner really ran: captions are new, the alt text moved to original_caption.
    assert all(not caption.startswith('a synthetic caption') for _, caption, _, _ in outputs[2])
    assert outputs[2][0][2] == 'alt text 0'
    # Two ranks wrote disjoint units: every other unit folder belongs to rank 1.
    assert sorted(n for n in os.listdir(tmp_path / 'ingested-2') if n.startswith('unit-')) == [
        f'unit-{u:06d}' for u in range(5)
    ]


@pytest.mark.slow
def test_a_killed_run_resumes_without_losing_or_duplicating_samples(tmp_path):
    # 40 large photos in units of 2: long enough to kill the run in the middle.
    rows = [commoncatalog_row(i, jpeg(photo(i, (1024, 768))), (1024, 768), i % 2) for i in range(40)]
    parquet = write_commoncatalog(str(tmp_path / 'cc.parquet'), rows)
    args = ['ingest', '--source', 'commoncatalog', '--input', parquet, '--unit-size', '2', '--max-side', '512']
    reference = str(tmp_path / 'reference')
    main([*args, '--out', reference, '--no-progress'])

    out = str(tmp_path / 'out')
    env = subprocess_env()
    process = subprocess.Popen(pipeline_command(*args, '--out', out), cwd=REPO_ROOT, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        finished = [n for n in os.listdir(out) if os.path.exists(os.path.join(out, n, 'stats.json'))] if (
            os.path.isdir(out)) else []  # fmt: skip
        if len(finished) >= 3:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    process.wait()
    assert process.returncode == -signal.SIGKILL, 'the run ended before it could be killed'
    finished = sorted(n for n in os.listdir(out) if os.path.exists(os.path.join(out, n, 'stats.json')))
    assert 3 <= len(finished) < 20 and not os.path.exists(os.path.join(out, 'index.json'))
    mtimes = {n: os.path.getmtime(os.path.join(out, n, 'stats.json')) for n in finished}

    result = run(pipeline_command(*args, '--out', out))
    assert f'skipping {len(finished)} finished units of 20' in result.stderr
    assert all(os.path.getmtime(os.path.join(out, n, 'stats.json')) == t for n, t in mtimes.items())
    resumed = [(s['key'], s['image']) for s in read_dataset(out, str(tmp_path / 'c1'))]
    expected = [(s['key'], s['image']) for s in read_dataset(reference, str(tmp_path / 'c2'))]
    assert len(resumed) == 40 and len({key for key, _ in resumed}) == 40
    assert resumed == expected
