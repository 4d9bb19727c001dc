"""Peak memory of the data pipeline as the dataset grows: ingest -> filter -> report on CommonCatalog-schema parquet.

Generates parquet files in the released CommonCatalog's columns with tiny distinct JPEGs (16x16, about 650 bytes),
5% exact duplicates and 5% near duplicates (a re-encode at another quality) of rows about 5,000 rows earlier,
so the duplicate passes have work across units. Each stage runs in its own process (``python -m diffusion.pipeline``
through :func:`diffusion.pipeline.__main__.main`) and reports its peak resident set size (``getrusage``), which
with ``--engine ranks`` and one process is the peak of the one worker; with ``--engine ray`` the Ray workers'
peaks are not counted here (they are other processes), so the figures are for the ranks engine.

    python benchmarks/pipeline_scale.py --rows 250000 1000000 --work /tmp/scale

Fails (exit 1) when a stage's peak at the largest size is over 1.2x its peak at the smallest.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from diffusion.pipeline.example import COMMONCATALOG_SCHEMA, YFCC_LICENSES

# The columns these files carry: CommonCatalog's, less usertags, exif and sha256.
SCHEMA = pa.schema([field for field in COMMONCATALOG_SCHEMA if field.name not in ('usertags', 'exif', 'sha256')])
LICENSES = YFCC_LICENSES[:3]
ROWS_PER_FILE = 250_000


def tiny_jpeg(seed: int, quality: int = 90) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)).resize((16, 16), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format='JPEG', quality=quality)
    return buffer.getvalue()


def generate(rows: int, folder: str) -> list[str]:
    """CommonCatalog-schema parquet files of ``rows`` rows in ``folder`` (row groups of 1,000)."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for first in range(0, rows, ROWS_PER_FILE):
        path = os.path.join(folder, f'commoncatalog-{first // ROWS_PER_FILE:05d}.parquet')
        paths.append(path)
        if os.path.exists(path):
            continue
        count = min(ROWS_PER_FILE, rows - first)
        columns: dict[str, list] = {name: [] for name in SCHEMA.names}
        for index in range(first, first + count):
            if index % 20 == 7 and index >= 5000:
                image = tiny_jpeg(index - 5000)  # the same bytes as an earlier row
            elif index % 20 == 13 and index >= 5000:
                image = tiny_jpeg(index - 5000, quality=60)  # a re-encode of an earlier row
            else:
                image = tiny_jpeg(index)
            name, url = LICENSES[index % 3]
            values = (image, f'synthetic caption {index}', f'alt {index}', f'Photo {index}', '', name, url, 16, 16,
                      1024, 768, 10_000_000 + index, f'{index % 997}@N00')  # fmt: skip
            for column, value in zip(SCHEMA.names, values):
                columns[column].append(value)
        pq.write_table(pa.table(columns, schema=SCHEMA), path + '.tmp', row_group_size=1000)
        os.replace(path + '.tmp', path)
    return paths


def run_stage(args: list[str]) -> dict:
    """Run one stage in a fresh process; its wall time and peak RSS."""
    start = time.perf_counter()
    child = [sys.executable, __file__, '--child', json.dumps(args)]
    result = subprocess.run(child, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f'{" ".join(args[:1])} failed:\n{result.stderr[-3000:]}')
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return {'seconds': time.perf_counter() - start, 'peak_rss_mb': report['peak_rss_mb']}


def child(args: list[str]) -> None:
    from diffusion.pipeline.__main__ import main

    main(args)
    print(json.dumps({'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure(rows: int, work: str, engine: str) -> dict:
    data = os.path.join(work, f'input-{rows}')
    start = time.perf_counter()
    generate(rows, data)
    print(f'{rows} rows: parquet in {time.perf_counter() - start:.0f} s', file=sys.stderr, flush=True)
    out = os.path.join(work, f'run-{rows}')
    shutil.rmtree(out, ignore_errors=True)
    common = ['--no-progress', '--engine', engine]
    stages = {
        'ingest': [
            'ingest',
            '--source',
            'commoncatalog',
            '--input',
            data,
            '--out',
            f'{out}/ingested',
            '--unit-size',
            '1000',
            *common,
        ],  # fmt: skip
        'filter': [
            'filter',
            '--input',
            f'{out}/ingested',
            '--out',
            f'{out}/filtered',
            '--preset',
            'commercial',
            '--min-side',
            '512',
            *common,
        ],  # fmt: skip
        'report': ['report', f'{out}/ingested', f'{out}/filtered', '--out', f'{out}/report'],
    }
    results = {}
    for name, args in stages.items():
        results[name] = run_stage(args)
        results[name]['rows_per_s'] = rows / results[name]['seconds']
        print(f'{rows} rows: {name} {json.dumps(results[name])}', file=sys.stderr, flush=True)
    with open(f'{out}/report/provenance.json') as f:
        final = json.load(f)['final']
    results['kept'] = final['images']
    shutil.rmtree(out, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--rows', type=int, nargs='+', default=[250_000, 1_000_000])
    parser.add_argument('--work', default='/tmp/pipeline-scale', help='Folder for the parquet inputs and outputs.')
    parser.add_argument('--engine', choices=('ranks', 'ray'), default='ranks')
    parser.add_argument('--json', default=None, help='Also write the results to this file.')
    parser.add_argument('--child', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    results = {rows: measure(rows, args.work, args.engine) for rows in args.rows}
    print('| rows | stage | wall s | peak RSS MiB | rows/s |')
    print('|---:|---|---:|---:|---:|')
    for rows, stages in results.items():
        for name in ('ingest', 'filter', 'report'):
            r = stages[name]
            print(f'| {rows:,} | {name} | {r["seconds"]:.0f} | {r["peak_rss_mb"]:.0f} | {r["rows_per_s"]:,.0f} |')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1)
    small, large = min(results), max(results)
    failed = [
        name
        for name in ('ingest', 'filter', 'report')
        if results[large][name]['peak_rss_mb'] > 1.2 * results[small][name]['peak_rss_mb']
    ]
    if len(results) > 1 and failed:
        print(f'peak RSS at {large:,} rows is over 1.2x that at {small:,} for: {", ".join(failed)}')
        sys.exit(1)


if __name__ == '__main__':
    main()
