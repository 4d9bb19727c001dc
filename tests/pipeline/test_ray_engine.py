"""``--engine ray``: the same files as the ranks engine with 1 or 2 Ray workers, a killed actor retried, resumes, S3."""

from __future__ import annotations

import json
import os
import re

import pytest

from diffusion.data.latents import StreamingLatentDataset
from diffusion.pipeline.__main__ import main
from diffusion.pipeline.captioners import save_tiny_blip2
from diffusion.pipeline.engines import FAULT_ENV
from tests.pipeline.test_pipeline import read_dataset, s3_keys
from tests.pipeline.test_precompute import precompute

# One local Ray cluster per module (the fixture), so the tests share one xdist worker; slow: every Ray worker process
# imports torch and the stack before its first unit, so the stages are ordered for Ray to reuse warm workers.
pytestmark = [pytest.mark.usefixtures('ray_cluster'), pytest.mark.slow, pytest.mark.xdist_group('ray')]

STAGES = ('ingested', 'filtered', 'captioned', 'precomputed', 'report')
ENGINES = {'ranks': ['--engine', 'ranks'], 'ray1': ['--engine', 'ray', '--workers', '1'],
           'ray2': ['--engine', 'ray', '--workers', '2']}  # fmt: skip


def tree(root: str, base: str = '') -> dict[str, bytes]:
    """Every file under ``root`` by relative path; stats without their timing and the run folder ``base`` (which
    the settings and the report name) as ``<out>``."""
    base = base or os.path.dirname(root)
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, 'rb') as f:
                data = f.read()
            if name in ('stats.json', 'provenance.json'):
                stats = json.loads(data)
                for unit in stats.get('stages', [stats]):
                    unit.pop('seconds', None)
                data = json.dumps(stats, sort_keys=True).encode()
            if name == 'provenance.md':
                data = re.sub(rb'dropped, [0-9.]+ s\.', b'dropped, <t> s.', data)
            files[os.path.relpath(path, root)] = data.replace(base.encode(), b'<out>')
    return files


def stages(parquet: str, out: str, engine: list[str], blip2: str, *, fault='', resume=False, latents=True) -> None:
    """Every stage into ``out``; ``fault``: the marker file that kills a captioning actor once; ``resume``: lose a
    finished ingest unit and rerun; ``latents``: run precompute (the test-size SD from the tiny yaml)."""
    ingest = ['ingest', '--source', 'commoncatalog', '--input', parquet, '--out', f'{out}/ingested', '--unit-size',
              '5', '--no-progress', *engine]  # fmt: skip
    main(ingest)
    if resume:  # while the workers that ingested are still there
        redo_a_lost_unit(ingest, f'{out}/ingested')
    main(['filter', '--input', f'{out}/ingested', '--out', f'{out}/filtered', '--preset', 'all', '--min-side', '0',
          '--no-progress', *engine])  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        if fault:
            patch.setenv(FAULT_ENV, fault)
        main(['caption', '--input', f'{out}/filtered', '--out', f'{out}/captioned', '--model', blip2,
              '--max-new-tokens', '4', '--batch-size', '4', '--no-progress', *engine])  # fmt: skip
    if latents:  # batches of 2: units of 5 end in a partial batch
        precompute(f'{out}/captioned', f'{out}/precomputed', '--batch-size', '2', *engine)
    main(['report', f'{out}/ingested', f'{out}/filtered', f'{out}/captioned', '--out', f'{out}/report'])


def redo_a_lost_unit(command: list[str], out: str) -> None:
    """Unit 2 lost its marker (as if killed while writing it): rerunning ``command`` redoes that unit alone."""
    os.remove(os.path.join(out, 'unit-000002', 'stats.json'))
    os.remove(os.path.join(out, 'index.json'))
    mtimes = {u: os.path.getmtime(os.path.join(out, u, 'stats.json')) for u in ('unit-000000', 'unit-000004')}
    main(command)
    assert os.path.exists(os.path.join(out, 'unit-000002', 'stats.json'))
    assert all(os.path.getmtime(os.path.join(out, u, 'stats.json')) == t for u, t in mtimes.items())


def test_ray_with_one_and_two_workers_writes_what_the_ranks_engine_writes(commoncatalog_parquet, tmp_path):
    """Ingest, filter, caption, precompute and report with each engine (precompute with 1 Ray worker); with 2 Ray
    workers a finished ingest unit is lost and redone by a rerun, and a captioning actor is killed halfway through a
    unit (and restarted by Ray). Every file of every stage is the ranks engine's."""
    blip2 = save_tiny_blip2(str(tmp_path / 'tiny-blip2'))
    trees = {}
    marker = tmp_path / 'fault'
    for name, engine in ENGINES.items():
        out = str(tmp_path / name)
        ray2 = name == 'ray2'
        # Precompute's actor imports and builds the model stack (about 30 s here): with 1 Ray worker only.
        stages(commoncatalog_parquet, out, engine, blip2, fault=str(marker) if ray2 else '', resume=ray2,
               latents=not ray2)  # fmt: skip
        trees[name] = {stage: tree(f'{out}/{stage}') for stage in STAGES if os.path.isdir(f'{out}/{stage}')}
    assert marker.exists(), 'no worker was killed'
    assert int(marker.read_text()) != os.getpid()
    assert len([p for p in trees['ranks']['captioned'] if p.endswith('.mds')]) >= 4
    # Same samples in the same order with the same bytes, latent columns included: the shard files are equal.
    assert len([p for p in trees['ranks']['precomputed'] if p.endswith('.mds')]) >= 4
    assert trees['ray1'] == trees['ranks']
    assert trees['ray2'] == {stage: files for stage, files in trees['ranks'].items() if stage != 'precomputed'}
    latents = StreamingLatentDataset(local=str(tmp_path / 'ray1' / 'precomputed'))
    assert len(latents) == 20 and latents[19]['image_latents_mean'].shape == (4, 8, 8)
    captioned = read_dataset(str(tmp_path / 'ray2' / 'captioned'), str(tmp_path / 'cache'))
    assert len(captioned) == 20 and not captioned[0]['caption'].startswith('a synthetic caption')


def test_ray_engine_from_s3_parquet_to_s3_shards(module_s3_server, commoncatalog_parquet, tmp_path):
    import boto3

    s3_server = module_s3_server  # the module's: a server of its own would change the workers' environment
    boto3.client('s3', endpoint_url=s3_server).upload_file(commoncatalog_parquet, 'test-bucket', 'raw/cc-0.parquet')
    local = str(tmp_path / 'local')
    runs = ((local, commoncatalog_parquet, ['--engine', 'ranks']), ('s3://test-bucket/ray', 's3://test-bucket/raw',
            ['--engine', 'ray', '--workers', '2']))  # fmt: skip
    for root, source, engine in runs:
        main(['ingest', '--source', 'commoncatalog', '--input', source, '--out', f'{root}/ingested',
              '--unit-size', '5', '--compression', 'zstd', '--no-progress', *engine])  # fmt: skip
        main(['filter', '--input', f'{root}/ingested', '--out', f'{root}/filtered', '--min-side', '0',
              '--no-progress', *engine])  # fmt: skip
    remote = read_dataset('s3://test-bucket/ray/filtered', str(tmp_path / 'c1'))
    expected = read_dataset(f'{local}/filtered', str(tmp_path / 'c2'))
    assert len(expected) == 8 and remote == expected
    assert s3_keys(s3_server, 'ray/filtered/') and not s3_keys(s3_server, 'ray/filtered/_work/')  # deleted at the end
