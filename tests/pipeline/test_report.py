import importlib.util
import json
import os

import pytest
from PIL import Image

from diffusion.pipeline.report import MAX_LISTED_DROPS, aggregate_stage, write_report

BY, NC, SA = 'CC-BY-2.0', 'CC-BY-NC-2.0', 'CC-BY-SA-2.0'
HAVE_LICENSES = importlib.util.find_spec('diffusion.data.licenses') is not None


def _drop(key, reason, lic, detail=''):
    return {'key': key, 'path': f'imgs/{key}.jpg', 'reason': reason, 'license': lic, 'detail': detail}


def _stages():
    # Units listed out of order on purpose: the aggregate must order dropped samples by unit.
    ingest = [
        {
            'stage': 'ingest',
            'unit': 1,
            'seen': 9,
            'kept': {BY: 5, SA: 1},
            'dropped': {'unknown_license': {'unknown': 1}, 'truncated': {BY: 2}},
            'dropped_samples': [
                _drop('p10', 'unknown_license', 'unknown'),
                _drop('p11', 'truncated', BY, 'image file is truncated'),
                _drop('p12', 'truncated', BY, 'image file is truncated'),
            ],
            'seconds': 2.5,
        },
        {
            'stage': 'ingest',
            'unit': 0,
            'seen': 10,
            'kept': {BY: 6, NC: 2},
            'dropped': {'unknown_license': {'unknown': 2}},
            'dropped_samples': [_drop('p0', 'unknown_license', 'unknown'), _drop('p1', 'unknown_license', 'unknown')],
            'seconds': 1.5,
        },
    ]
    filt = [
        {
            'stage': 'filter',
            'unit': 0,
            'seen': 8,
            'kept': {BY: 5, NC: 2},
            'dropped': {'near_duplicate': {BY: 1}},
            'dropped_samples': [_drop('p3', 'near_duplicate', BY, 'duplicate of p2')],
            'seconds': 0.25,
        },
        {
            'stage': 'filter',
            'unit': 1,
            'seen': 6,
            'kept': {BY: 4},
            'dropped': {'near_duplicate': {BY: 1, SA: 1}},
            'dropped_samples': [_drop('p13', 'near_duplicate', BY), _drop('p14', 'near_duplicate', SA)],
            'seconds': 0.75,
        },
    ]
    return {'ingest': ingest, 'filter': filt}


def _manifest():
    # A generator, as the pipeline hands it over: write_report must read it once, streaming.
    for i in range(9):
        yield {
            'key': f'by-{i}',
            'source_url': f'https://example.org/photos/{i}',
            'attribution': f'Author {i}',
            'license': BY,
            'title': f'Photo {i}' if i % 2 == 0 else '',
        }
    for i in range(2):
        yield {
            'key': f'nc-{i}',
            'source_url': f'https://example.org/nc/{i}',
            'attribution': 'Jane Doe',
            'license': NC,
            'title': 'A lake\nat dusk',
        }


def test_aggregate_stage_sums_units_exactly():
    agg = aggregate_stage(_stages()['ingest'])
    assert agg['stage'] == 'ingest'
    assert agg['units'] == 2
    assert agg['seen'] == 19
    assert agg['kept'] == {BY: 11, NC: 2, SA: 1}
    assert agg['dropped'] == {'truncated': {BY: 2}, 'unknown_license': {'unknown': 3}}
    assert agg['kept_total'] == 14
    assert agg['dropped_total'] == 5
    assert agg['dropped_by_reason'] == {'truncated': 2, 'unknown_license': 3}
    assert agg['seconds'] == pytest.approx(4.0)
    assert [s['key'] for s in agg['dropped_samples']] == ['p0', 'p1', 'p10', 'p11', 'p12']
    assert [s['unit'] for s in agg['dropped_samples']] == [0, 0, 1, 1, 1]
    assert agg['dropped_samples'][3]['detail'] == 'image file is truncated'

    filt = aggregate_stage(_stages()['filter'])
    assert filt['kept'] == {BY: 9, NC: 2}
    assert filt['dropped'] == {'near_duplicate': {BY: 2, SA: 1}}
    assert (filt['seen'], filt['kept_total'], filt['dropped_total']) == (14, 11, 3)


def test_aggregate_stage_rejects_units_that_lose_samples():
    units = _stages()['filter']
    units[1]['seen'] = 7  # one sample neither kept nor dropped
    with pytest.raises(ValueError, match=r"stage 'filter', unit 1: seen=7"):
        aggregate_stage(units)


def test_aggregate_stage_rejects_mixed_stages_and_handles_no_units():
    stages = _stages()
    with pytest.raises(ValueError, match='unit 0 reports stage'):
        aggregate_stage(stages['ingest'] + stages['filter'])
    empty = aggregate_stage([], stage='caption')
    assert (empty['stage'], empty['units'], empty['seen'], empty['kept_total'], empty['dropped_samples']) == (
        'caption',
        0,
        0,
        0,
        [],
    )


def test_write_report_writes_all_files(tmp_path):
    out = tmp_path / 'report'  # does not exist yet
    report = write_report(_stages(), _manifest(), str(out), title='CC test set')
    names = ['provenance.json', 'provenance.md', 'attribution.jsonl', 'ATTRIBUTION.txt', 'license_mix.png']
    assert sorted(os.listdir(out)) == sorted(names)  # and no leftover temporary files

    with open(out / 'provenance.json', encoding='utf-8') as f:
        loaded = json.load(f)
    assert loaded == report
    assert loaded['title'] == 'CC test set'
    assert [s['stage'] for s in loaded['stages']] == ['ingest', 'filter']
    assert loaded['stages'][0]['kept'] == {BY: 11, NC: 2, SA: 1}
    assert loaded['stages'][1]['dropped_by_reason'] == {'near_duplicate': 3}
    assert loaded['final'] == {'images': 11, 'licenses': {BY: 9, NC: 2}}
    assert list(loaded['final']['licenses']) == [BY, NC]  # largest first


def test_attribution_files_have_one_entry_per_image(tmp_path):
    write_report(_stages(), _manifest(), str(tmp_path))
    with open(tmp_path / 'attribution.jsonl', encoding='utf-8') as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 11
    assert rows[0]['key'] == 'by-0'
    assert rows[0]['source_url'] == 'https://example.org/photos/0'
    assert rows[0]['attribution'] == 'Author 0'
    assert rows[0]['license'] == BY
    assert rows[0]['title'] == 'Photo 0'
    assert rows[1]['title'] == ''
    assert rows[-1]['title'] == 'A lake\nat dusk'  # the JSON keeps the original metadata
    assert all(set(r) == {'key', 'source_url', 'attribution', 'license', 'license_url', 'title'} for r in rows)
    if HAVE_LICENSES:
        assert all(r['license_url'].startswith('https://creativecommons.org/') for r in rows)
        assert rows[0]['license_url'] != rows[-1]['license_url']  # BY and BY-NC have different deeds

    with open(tmp_path / 'ATTRIBUTION.txt', encoding='utf-8') as f:
        lines = f.read().splitlines()
    assert len(lines) == 11
    by_url, nc_url = rows[0]['license_url'], rows[-1]['license_url']
    by_deed = f' ({by_url})' if by_url else ''
    nc_deed = f' ({nc_url})' if nc_url else ''
    assert lines[0] == f'Photo 0 by Author 0, {BY}{by_deed}, https://example.org/photos/0'
    assert lines[1] == f'by-1 by Author 1, {BY}{by_deed}, https://example.org/photos/1'  # no title: the key
    assert lines[-1] == f'A lake at dusk by Jane Doe, {NC}{nc_deed}, https://example.org/nc/1'  # stays one line


def test_license_mix_png_is_a_readable_chart(tmp_path):
    write_report(_stages(), _manifest(), str(tmp_path))
    with Image.open(tmp_path / 'license_mix.png') as im:
        im.verify()
    with Image.open(tmp_path / 'license_mix.png') as im:
        assert im.format == 'PNG'
        width, height = im.size
    assert 600 <= width <= 1200 and 200 <= height <= 1200


def test_markdown_summarises_stages_and_drops(tmp_path):
    write_report(_stages(), _manifest(), str(tmp_path), title='CC test set')
    md = (tmp_path / 'provenance.md').read_text(encoding='utf-8')
    assert md.startswith('# CC test set\n')
    assert '**11 images**' in md
    assert '![license mix](license_mix.png)' in md
    assert '## Stage `ingest`' in md and '## Stage `filter`' in md
    # ingest: columns license | kept | truncated | unknown_license | seen.
    assert '| license | kept | truncated | unknown_license | seen |' in md
    assert f'| {BY} | 11 | 2 | 0 | 13 |' in md
    assert '| unknown | 0 | 0 | 3 | 3 |' in md
    assert '| **total** | 14 | 2 | 3 | 19 |' in md
    assert '| **total** | 11 | 3 | 14 |' in md  # filter
    assert '`imgs/p11.jpg`' in md and 'image file is truncated' in md
    assert 'more omitted' not in md
    assert 'ATTRIBUTION.txt' in md and 'attribution.jsonl' in md


def test_markdown_caps_listed_drops(tmp_path):
    n = MAX_LISTED_DROPS + 7
    unit = {
        'stage': 'filter',
        'unit': 0,
        'seen': n + 1,
        'kept': {BY: 1},
        'dropped': {'too_small': {BY: n}},
        'dropped_samples': [_drop(f'small-{i}', 'too_small', BY, '32x32 < 256') for i in range(n)],
        'seconds': 1.0,
    }
    manifest = [{'key': 'k', 'source_url': 'https://example.org/k', 'attribution': 'A', 'license': BY, 'title': ''}]
    report = write_report({'filter': [unit]}, manifest, str(tmp_path))
    assert len(report['stages'][0]['dropped_samples']) == n  # the JSON keeps every drop
    md = (tmp_path / 'provenance.md').read_text(encoding='utf-8')
    assert f'`imgs/small-{MAX_LISTED_DROPS - 1}.jpg`' in md
    assert f'`imgs/small-{MAX_LISTED_DROPS}.jpg`' not in md
    assert '... 7 more omitted' in md


def test_write_report_fails_before_writing_when_counts_do_not_add_up(tmp_path):
    stages = _stages()
    stages['ingest'][0]['seen'] += 1  # unit 1 of ingest
    with pytest.raises(ValueError, match="stage 'ingest', unit 1"):
        write_report(stages, _manifest(), str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_empty_dataset_still_gets_a_report(tmp_path):
    report = write_report({'ingest': []}, iter([]), str(tmp_path))
    assert report['final'] == {'images': 0, 'licenses': {}}
    assert (tmp_path / 'attribution.jsonl').read_text() == ''
    with Image.open(tmp_path / 'license_mix.png') as im:
        assert im.format == 'PNG'
