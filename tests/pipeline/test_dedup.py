"""The filter's partitioned duplicate passes make the decisions of the in-memory rule, on rows spread over units."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from diffusion.pipeline.filtering import FilterOptions, decide, filter_dataset, read_side_table
from diffusion.pipeline.runner import StageRunner
from diffusion.pipeline.shards import InputDataset

UNIT_ROWS = 100


def _flip(phash: int, bits: list[int]) -> int:
    for bit in bits:
        phash ^= 1 << int(bit)
    return phash


def planted_rows(count: int, seed: int = 0) -> list[dict]:
    """Side-table rows with exact duplicates, near duplicates (1-4 bits), far ones (5-7 bits) and chains, most of
    them pointing at rows in other units; some with a non-commercial license or too small."""
    rng = np.random.default_rng(seed)
    rows: list[dict] = []
    licenses = ['CC-BY-2.0', 'CC-BY-SA-2.0', 'CC-BY-NC-2.0']
    for index in range(count):
        phash = int(rng.integers(0, 1 << 63)) * 2 + int(rng.integers(0, 2))
        sha = f'{int(rng.integers(0, 1 << 62)):064x}'
        kind = rng.random()
        if index > 10 and kind < 0.45:
            earlier = rows[int(rng.integers(0, index))]
            if kind < 0.12:  # the same bytes
                sha, phash = earlier['sha256'], int(earlier['phash'], 16)
            elif kind < 0.30:  # a re-encode: 1 to 4 bits off
                phash = _flip(int(earlier['phash'], 16), list(rng.choice(64, int(rng.integers(1, 5)), replace=False)))
            else:  # close to a near duplicate but farther from its original: chains
                phash = _flip(int(earlier['phash'], 16), list(rng.choice(64, int(rng.integers(3, 8)), replace=False)))
        small = rng.random() < 0.05
        rows.append(
            {
                'key': f'row-{index:05d}',
                'sha256': sha,
                'phash': f'{phash:016x}',
                'license': licenses[int(rng.integers(0, 3))] if rng.random() < 0.3 else 'CC-BY-2.0',
                'original_width': 300 if small else 1024,
                'original_height': 768,
            }
        )
    return rows


def write_dataset(rows: list[dict], out: str) -> None:
    """An ingest-shaped dataset of ``rows`` (one-byte images), ``UNIT_ROWS`` rows per unit."""
    runner = StageRunner('ingest', out, {'planted': len(rows)}, progress=False)

    def process(unit: int):
        for row in rows[unit * UNIT_ROWS : (unit + 1) * UNIT_ROWS]:
            yield {'image': b'x', 'caption': '', 'original_caption': '', 'attribution': 'a', 'source_url': '',
                   'title': '', 'width': 8, 'height': 6, **row}  # fmt: skip

    runner.run(-(-len(rows) // UNIT_ROWS), process)


def stage_decisions(out: str) -> list[tuple[str, str, str]]:
    """(key, reason or 'kept', detail) of every sample, in order, from the filter's stats and shards."""
    by_key = {}
    names = sorted(n for n in os.listdir(out) if n.startswith('unit-'))
    for name in names:
        with open(os.path.join(out, name, 'stats.json')) as f:
            for drop in json.load(f)['dropped_samples']:
                by_key[drop['key']] = (drop['key'], drop['reason'], drop['detail'])
        with open(os.path.join(out, name, 'samples.jsonl')) as f:
            for line in f:
                key = json.loads(line)['key']
                by_key[key] = (key, 'kept', '')
    return [by_key[k] for k in sorted(by_key)]


@pytest.mark.parametrize(
    'options',
    [
        FilterOptions(preset='commercial', min_side=512),
        FilterOptions(preset='all', min_side=0, exact_duplicates=False, near_duplicate_distance=3),
        FilterOptions(preset='all', min_side=0, near_duplicate_distance=None),
    ],
    ids=['exact+near4', 'near3-only', 'exact-only'],
)
def test_partitioned_passes_decide_as_the_in_memory_rule(options, tmp_path):
    rows = planted_rows(3000)
    ingested = str(tmp_path / 'ingested')
    write_dataset(rows, ingested)
    table = read_side_table(InputDataset(ingested, str(tmp_path / 'cache')))
    expected = [
        (row['key'], 'kept', '') if drop is None else (drop.key, drop.reason, drop.detail)
        for row, drop in zip(table, decide(table, options))
    ]
    reasons = {reason for _, reason, _ in expected}
    assert 'kept' in reasons
    assert ('near_duplicate' in reasons) == (options.near_duplicate_distance is not None)
    assert ('exact_duplicate' in reasons) == options.exact_duplicates
    # 400 rows per partition: 8 blocks, 8 hash partitions and up to 38 band partitions for 3,000 rows.
    out = str(tmp_path / 'filtered')
    filter_dataset(ingested, out, options=options, partition_rows=400, progress=False)
    assert stage_decisions(out) == expected
    assert not os.path.exists(os.path.join(out, '_work'))  # spilled partitions are removed once the stage is done


def test_same_bytes_with_another_perceptual_hash_is_refused(tmp_path):
    rows = planted_rows(50)
    rows[40].update(sha256=rows[3]['sha256'], phash=f'{int(rows[3]["phash"], 16) ^ 0xFFFF:016x}')
    write_dataset(rows, str(tmp_path / 'ingested'))
    with pytest.raises(ValueError, match='row-00003 and row-00040 have the same sha256 but different phash'):
        filter_dataset(str(tmp_path / 'ingested'), str(tmp_path / 'out'), options=FilterOptions(min_side=0),
                       progress=False)  # fmt: skip
