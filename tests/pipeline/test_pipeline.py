"""The pipeline as users run it: ``python -m diffusion.pipeline <stage>`` on every source, bad inputs, S3."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from diffusion.data.fingerprint import fingerprint_local
from diffusion.data.image_caption import StreamingImageCaptionDataset
from diffusion.pipeline.__main__ import main
from diffusion.pipeline.engines import actor_gpus
from diffusion.pipeline.shards import InputDataset
from tests.pipeline.conftest import commoncatalog_row, jpeg, photo, png, png_bomb, write_commoncatalog


def read_dataset(root: str, cache: str) -> list[dict]:
    """Every sample of a pipeline output, in order."""
    dataset = InputDataset(root, cache)
    return [sample for shard in range(len(dataset)) for sample in dataset.iter_shard(shard)]


def s3_keys(endpoint: str, prefix: str) -> list[str]:
    """The keys under ``prefix`` of the test bucket."""
    import boto3

    pages = boto3.client('s3', endpoint_url=endpoint).get_paginator('list_objects_v2')
    return [o['Key'] for page in pages.paginate(Bucket='test-bucket', Prefix=prefix) for o in page.get('Contents', [])]


def dropped(root: str) -> dict[str, int]:
    """Dropped samples per reason, summed over the units of a local output."""
    counts: dict[str, int] = {}
    for name in sorted(os.listdir(root)):
        if name.startswith('unit-'):
            with open(os.path.join(root, name, 'stats.json')) as f:
                for reason, by_license in json.load(f)['dropped'].items():
                    counts[reason] = counts.get(reason, 0) + sum(by_license.values())
    return counts


def ingest_commoncatalog(parquet: str, out: str, *extra: str) -> None:
    main(['ingest', '--source', 'commoncatalog', '--input', parquet, '--out', out, '--unit-size', '10',
          '--no-progress', *extra])  # fmt: skip


def test_commoncatalog_parquet_to_training_shards_in_one_command(commoncatalog_parquet, tmp_path):
    out = str(tmp_path / 'ingested')
    ingest_commoncatalog(commoncatalog_parquet, out)
    samples = read_dataset(out, str(tmp_path / 'cache'))
    assert [s['key'] for s in samples] == [str(1000 + i) for i in [*range(20), 23]]
    first = samples[0]
    assert first['caption'] == 'a synthetic caption number 0'  # blip2_caption trains by default
    assert first['original_caption'] == 'alt text 0'
    assert first['license'] == 'CC-BY-2.0' and samples[2]['license'] == 'CC-BY-NC-2.0'
    assert first['attribution'] == 'Flickr user 0@N00'
    assert first['source_url'] == 'https://www.flickr.com/photos/0@N00/1000'
    assert (first['width'], first['height']) == (96, 64)
    # CommonCatalog ships downscaled images; the original Flickr size is what filters and conditioning need.
    assert (first['original_width'], first['original_height']) == (384, 256)
    assert dropped(out) == {'unknown_license': 1, 'truncated': 1, 'empty_file': 1}
    # The result is a training dataset as it stands.
    train = StreamingImageCaptionDataset(local=out, resolution=32, crop='center')
    assert len(train) == 21 and train[0]['image'].shape == (3, 32, 32)
    assert train[0]['captions'] == 'a synthetic caption number 0'


def test_filter_by_license_preset_size_aspect_and_duplicates(commoncatalog_parquet, tmp_path):
    ingested = str(tmp_path / 'ingested')
    ingest_commoncatalog(commoncatalog_parquet, ingested)
    # Five licenses in turn over rows 0-19: BY, BY-SA, BY-NC, BY-NC-SA, BY-ND; row 23 repeats row 0's bytes.
    commercial = str(tmp_path / 'commercial')
    main(['filter', '--input', ingested, '--out', commercial, '--min-side', '200', '--no-progress'])
    keys = [s['key'] for s in read_dataset(commercial, str(tmp_path / 'c1'))]
    assert keys == [str(1000 + i) for i in range(20) if i % 5 in (0, 1)]
    assert dropped(commercial) == {'license_not_allowed': 12, 'exact_duplicate': 1}

    noncommercial = str(tmp_path / 'noncommercial')
    main(['filter', '--input', ingested, '--out', noncommercial, '--preset', 'noncommercial', '--min-side', '200',
          '--no-progress'])  # fmt: skip
    assert dropped(noncommercial) == {'license_not_allowed': 4, 'exact_duplicate': 1}

    strict = str(tmp_path / 'strict')
    main(['filter', '--input', ingested, '--out', strict, '--preset', 'all', '--min-side', '300', '--no-progress'])
    assert dropped(strict) == {'too_small': 21}  # originals are 384x256
    square = str(tmp_path / 'square')
    main(['filter', '--input', ingested, '--out', square, '--preset', 'all', '--min-side', '0', '--max-aspect',
          '1.2', '--no-progress'])  # fmt: skip
    assert dropped(square) == {'aspect_ratio': 21}


def test_near_duplicates_are_dropped_and_the_first_kept(tmp_path):
    base = photo(1, (256, 192))
    rows = [
        commoncatalog_row(0, jpeg(base, quality=95), (256, 192), 0),
        commoncatalog_row(1, jpeg(photo(2, (256, 192))), (256, 192), 0),
        commoncatalog_row(2, jpeg(base.resize((200, 150)), quality=60), (200, 150), 0),  # re-encoded and resized
    ]
    parquet = write_commoncatalog(str(tmp_path / 'cc.parquet'), rows)
    ingested, filtered = str(tmp_path / 'ingested'), str(tmp_path / 'filtered')
    ingest_commoncatalog(parquet, ingested)
    main(['filter', '--input', ingested, '--out', filtered, '--min-side', '0', '--no-progress'])
    assert [s['key'] for s in read_dataset(filtered, str(tmp_path / 'c'))] == ['1000', '1001']
    assert dropped(filtered) == {'near_duplicate': 1}
    off = str(tmp_path / 'off')
    main(['filter', '--input', ingested, '--out', off, '--min-side', '0', '--near-duplicate-distance', '-1',
          '--no-progress'])  # fmt: skip
    assert dropped(off) == {}


def real_photos() -> list[Image.Image]:
    """The two CC BY 2.0 photos that ship with scikit-learn (china.jpg, flower.jpg)."""
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(array) for array in load_sample_images().images]


def write_folder(root: str) -> None:
    """Images with every kind of damage, and a CSV describing them (one row has a Latin-1 caption)."""
    os.makedirs(os.path.join(root, 'images'))
    files = {
        'china.jpg': jpeg(real_photos()[0]),
        'flower.jpg': jpeg(real_photos()[1]),
        'truncated.jpg': jpeg(photo(3, (256, 256)))[:400],
        'empty.jpg': b'',
        'bomb.png': png_bomb(),
        'mislabelled.png': jpeg(photo(4)),
        'no-license.jpg': jpeg(photo(5)),
        'latin1.jpg': jpeg(photo(6)),
    }
    for name, data in files.items():
        with open(os.path.join(root, 'images', name), 'wb') as f:
            f.write(data)
    lines = [b'path,url,license,author,title,caption,width,height']
    for name in files:
        license_text = b'' if name == 'no-license.jpg' else b'CC BY 2.0'
        caption = b'un caf\xe9' if name == 'latin1.jpg' else b'alt text'  # Latin-1, not UTF-8
        lines.append(b'images/%s,https://example.org/%s,%s,Author,%s,%s,640,427' % (
            name.encode(), name.encode(), license_text, name.encode(), caption))  # fmt: skip
    lines.append(b'images/gone.jpg,https://example.org/gone,CC BY 2.0,Author,gone,alt text,640,427')
    with open(os.path.join(root, 'metadata.csv'), 'wb') as f:
        f.write(b'\n'.join(lines) + b'\n')


def test_folder_source_drops_each_bad_input_under_its_reason(tmp_path):
    write_folder(str(tmp_path / 'raw'))
    out = str(tmp_path / 'out')
    main(['ingest', '--source', 'folder', '--input', str(tmp_path / 'raw' / 'metadata.csv'), '--out', out,
          '--max-side', '256', '--no-progress'])  # fmt: skip
    samples = read_dataset(out, str(tmp_path / 'cache'))
    assert [s['key'] for s in samples] == ['images/china.jpg', 'images/flower.jpg']
    assert all(s['license'] == 'CC-BY-2.0' and s['attribution'] == 'Author' for s in samples)
    # The real photos (640x427) are stored at --max-side and remember their original size.
    assert [(s['width'], s['height'], s['original_width']) for s in samples] == [(256, 171, 640)] * 2
    assert dropped(out) == {
        'truncated': 1,
        'empty_file': 1,
        'decompression_bomb': 1,
        'wrong_extension': 1,
        'missing_field': 1,
        'bad_text_encoding': 1,
        'missing_file': 1,
    }
    with open(os.path.join(out, 'unit-000000', 'stats.json')) as f:
        paths = {d['reason']: d['path'] for d in json.load(f)['dropped_samples']}
    assert paths['truncated'].endswith('images/truncated.jpg')  # drops name the file
    assert paths['missing_file'].endswith('images/gone.jpg')


@pytest.mark.parametrize('metadata_format', ['jsonl', 'parquet'])
def test_folder_source_reads_jsonl_and_parquet_metadata(tmp_path, metadata_format):
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(tmp_path / 'images')
    rows = []
    for index, image in enumerate(real_photos()):
        image.save(tmp_path / 'images' / f'{index}.jpg')
        rows.append({'file_name': f'images/{index}.jpg', 'url': f'https://example.org/{index}',
                     'license': 'https://creativecommons.org/licenses/by-sa/4.0/', 'creator': f'Person {index}',
                     'title': f'Photo {index}', 'alt_text': f'alt {index}', 'width': 640, 'height': 427})  # fmt: skip
    metadata = str(tmp_path / f'metadata.{metadata_format}')
    if metadata_format == 'jsonl':
        with open(metadata, 'w') as f:
            f.writelines(json.dumps(row) + '\n' for row in rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), metadata)
    out = str(tmp_path / 'out')
    main(['ingest', '--source', 'folder', '--input', metadata, '--out', out, '--no-progress'])
    samples = read_dataset(out, str(tmp_path / 'cache'))
    assert [(s['license'], s['attribution'], s['original_caption'], s['caption']) for s in samples] == [
        ('CC-BY-SA-4.0', 'Person 0', 'alt 0', ''),
        ('CC-BY-SA-4.0', 'Person 1', 'alt 1', ''),
    ]
    # JPEGs within --max-side keep their bytes: no second lossy compression.
    with open(tmp_path / 'images' / '0.jpg', 'rb') as f:
        assert samples[0]['image'] == f.read()


def test_parquet_source_with_image_paths(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(tmp_path / 'photos')
    rows = []
    for index in range(3):
        photo(index, (128, 96)).save(tmp_path / 'photos' / f'{index}.png')
        rows.append(
            {
                'image_path': f'photos/{index}.png',
                'license': 4,
                'author': 'A',
                'title': f't{index}',
                'source_url': f'https://example.org/{index}',
                'synthetic_caption': f'caption {index}',
            }
        )
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / 'meta.parquet')
    out = str(tmp_path / 'out')
    main(['ingest', '--source', 'parquet', '--input', str(tmp_path / 'meta.parquet'), '--out', out,
          '--image-format', 'png', '--no-progress'])  # fmt: skip
    samples = read_dataset(out, str(tmp_path / 'cache'))
    # Flickr license id 4 is CC BY 2.0; PNG inputs stored as PNG keep their bytes.
    assert [(s['license'], s['caption']) for s in samples] == [('CC-BY-2.0', f'caption {i}') for i in range(3)]
    with open(tmp_path / 'photos' / '2.png', 'rb') as f:
        assert samples[2]['image'] == f.read()


def test_webdataset_source(tmp_path):
    tar_path = str(tmp_path / 'shard-00000.tar')
    members = {
        'a.jpg': jpeg(photo(1)),
        'a.json': json.dumps({'license': 'CC0', 'title': 'first', 'url': 'https://example.org/a'}).encode(),
        'a.txt': b'a caption from the txt member',
        'b.png': png(photo(2)),
        'b.json': json.dumps({'license': 'CC BY-NC 4.0', 'author': 'B', 'url': 'https://example.org/b'}).encode(),
        'c.jpg': jpeg(photo(3)),  # no metadata
    }
    with tarfile.open(tar_path, 'w') as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = str(tmp_path / 'out')
    main(['ingest', '--source', 'webdataset', '--input', str(tmp_path), '--out', out, '--no-progress'])
    samples = read_dataset(out, str(tmp_path / 'cache'))
    assert [(s['key'], s['license'], s['original_caption']) for s in samples] == [
        ('a', 'CC0-1.0', 'a caption from the txt member'),  # CC0 needs no attribution
        ('b', 'CC-BY-NC-4.0', ''),
    ]
    assert dropped(out) == {'missing_field': 1}


def test_bad_paths_and_columns_fail_at_start(commoncatalog_parquet, tmp_path):
    with pytest.raises(FileNotFoundError, match='nowhere'):
        ingest_commoncatalog(str(tmp_path / 'nowhere'), str(tmp_path / 'out'))
    blocker = tmp_path / 'a-file'
    blocker.write_text('')
    with pytest.raises(PermissionError, match='not writable'):
        ingest_commoncatalog(commoncatalog_parquet, str(blocker / 'out'))
    with open(tmp_path / 'metadata.csv', 'w') as f:
        f.write('path,author\nx.jpg,someone\n')
    with pytest.raises(ValueError, match=r'metadata.csv has no license column \(accepted names: license, licensename'):
        main(['ingest', '--source', 'folder', '--input', str(tmp_path / 'metadata.csv'), '--out', str(tmp_path / 'o')])
    with pytest.raises(FileNotFoundError, match='Input dataset folder'):
        main(['filter', '--input', str(tmp_path / 'missing'), '--out', str(tmp_path / 'f')])


def test_the_shell_command_reports_a_bad_path_in_one_line(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, '-m', 'diffusion.pipeline', 'filter', '--input', str(tmp_path / 'missing'), '--out',
         str(tmp_path / 'out')],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    message = f'python -m diffusion.pipeline: error: Input dataset folder {tmp_path}/missing does not exist.'
    assert result.stderr.strip() == message
    assert not os.path.exists(tmp_path / 'out')  # nothing is created before the inputs are checked


def test_ray_actors_take_gpus_when_the_cluster_has_them():
    # The cluster decides, not the driver's machine: a driver on a CPU head node still gives the actors their GPUs.
    assert actor_gpus(None, {'CPU': 64.0, 'GPU': 8.0}) == 1
    assert actor_gpus(None, {'CPU': 2.0}) == 0
    assert actor_gpus(0.5, {'CPU': 2.0, 'GPU': 1.0}) == 0.5 and actor_gpus(0, {'GPU': 8.0}) == 0


def test_rerun_with_other_settings_needs_overwrite(commoncatalog_parquet, tmp_path):
    out = str(tmp_path / 'out')
    ingest_commoncatalog(commoncatalog_parquet, out)
    with pytest.raises(ValueError, match='differs in: max_side'):
        ingest_commoncatalog(commoncatalog_parquet, out, '--max-side', '32')
    ingest_commoncatalog(commoncatalog_parquet, out, '--max-side', '32', '--overwrite')
    assert {s['width'] for s in read_dataset(out, str(tmp_path / 'cache'))} == {32}


def test_report_counts_every_sample_and_credits_every_image(commoncatalog_parquet, tmp_path):
    ingested, filtered, report = (str(tmp_path / name) for name in ('ingested', 'filtered', 'report'))
    ingest_commoncatalog(commoncatalog_parquet, ingested)
    main(['filter', '--input', ingested, '--out', filtered, '--min-side', '200', '--no-progress'])
    main(['report', ingested, filtered, '--out', report])
    with open(os.path.join(report, 'provenance.json')) as f:
        provenance = json.load(f)
    ingest_stage, filter_stage = provenance['stages']
    assert (ingest_stage['seen'], ingest_stage['kept_total'], ingest_stage['dropped_total']) == (24, 21, 3)
    assert (filter_stage['seen'], filter_stage['kept_total']) == (21, 8)
    # The report names the dataset it describes (the last stage's output, what a run trains on) by the
    # fingerprint the run records in its checkpoints, so that export can check a model card's license mix.
    fingerprint = [fingerprint_local(filtered)]
    assert fingerprint[0]['num_samples'] == 8
    assert provenance['final'] == {
        'images': 8,
        'licenses': {'CC-BY-2.0': 4, 'CC-BY-SA-2.0': 4},
        'fingerprint': fingerprint,
    }
    assert StreamingImageCaptionDataset(local=filtered).fingerprint() == fingerprint
    with open(os.path.join(report, 'attribution.jsonl')) as f:
        credits = [json.loads(line) for line in f]
    assert len(credits) == 8
    assert credits[0]['source_url'] == 'https://www.flickr.com/photos/0@N00/1000'
    assert credits[0]['license_url'] == 'https://creativecommons.org/licenses/by/2.0/'
    assert Image.open(os.path.join(report, 'license_mix.png')).size[0] > 200
    with open(os.path.join(report, 'provenance.md')) as f:
        markdown = f.read()
    assert 'unknown_license' in markdown
    digest = fingerprint[0]['index_sha256'][:12]
    assert f'Dataset fingerprint: `{filtered}` (8 samples, index.json sha256 {digest}).' in markdown


@pytest.mark.remote
def test_stages_read_and_write_object_storage(s3_server, commoncatalog_parquet, tmp_path):
    ingest_commoncatalog(commoncatalog_parquet, 's3://test-bucket/ingested', '--compression', 'zstd')
    main(['filter', '--input', 's3://test-bucket/ingested', '--out', 's3://test-bucket/filtered', '--min-side',
          '200', '--no-progress'])  # fmt: skip
    main(['report', 's3://test-bucket/ingested', 's3://test-bucket/filtered', '--out', str(tmp_path / 'report')])
    with open(tmp_path / 'report' / 'provenance.json') as f:
        assert json.load(f)['final']['images'] == 8
    train = StreamingImageCaptionDataset(
        remote='s3://test-bucket/filtered', local=str(tmp_path / 'cache'), resolution=32, crop='center'
    )
    assert len(train) == 8 and train[7]['captions'] == 'a synthetic caption number 16'
    local = read_dataset('s3://test-bucket/filtered', str(tmp_path / 'read'))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(local[0]['image']))).shape, (64, 96, 3))
    # The filter's spilled passes are gone once it succeeded: the published output is shards, side tables, stats.
    assert s3_keys(s3_server, 'filtered/') and not s3_keys(s3_server, 'filtered/_work/')


@pytest.mark.remote
def test_a_failed_filter_on_object_storage_keeps_its_work_for_the_rerun(
    s3_server, commoncatalog_parquet, tmp_path, monkeypatch
):
    from diffusion.pipeline.dedup import BlockDecisions

    ingest_commoncatalog(commoncatalog_parquet, 's3://test-bucket/ingested')
    command = ['filter', '--input', 's3://test-bucket/ingested', '--out', 's3://test-bucket/filtered',
               '--no-progress']  # fmt: skip

    def crash(self, row):
        raise RuntimeError('killed while writing units')

    with monkeypatch.context() as patch, pytest.raises(RuntimeError, match='killed while writing units'):
        patch.setattr(BlockDecisions, 'drop_of', crash)  # after the global passes, in the first unit
        main([*command, '--min-side', '200'])
    assert s3_keys(s3_server, 'filtered/_work/done/') and not s3_keys(s3_server, 'filtered/index.json')
    main([*command, '--min-side', '200'])  # resumes from the spilled passes, then deletes them
    assert len(read_dataset('s3://test-bucket/filtered', str(tmp_path / 'a'))) == 8
    assert not s3_keys(s3_server, 'filtered/_work/')
    # Other settings decide afresh: the earlier run's units, markers and decisions are deleted first (a marker left
    # there made the stage skip its passes, and their decisions, left too, would have been applied).
    main([*command, '--min-side', '0', '--preset', 'all', '--overwrite'])
    assert len(read_dataset('s3://test-bucket/filtered', str(tmp_path / 'b'))) == 20
    assert not s3_keys(s3_server, 'filtered/_work/')


def test_example_input_goes_through_ingest_and_filter(tmp_path):
    from diffusion.pipeline.example import write_example

    parquet = write_example(str(tmp_path), num_samples=12, image_size=96)
    assert os.path.exists(tmp_path / 'tiny-blip2' / 'config.json')
    ingested, filtered = str(tmp_path / 'ingested'), str(tmp_path / 'filtered')
    ingest_commoncatalog(parquet, ingested)
    assert dropped(ingested) == {'unknown_license': 1, 'truncated': 1, 'empty_file': 1}
    main(['filter', '--input', ingested, '--out', filtered, '--min-side', '192', '--no-progress'])
    # Six YFCC licenses in turn: BY and BY-SA are commercial, i.e. photos 0, 1, 6, 7; the repeat of 6 goes.
    assert [s['key'] for s in read_dataset(filtered, str(tmp_path / 'c'))] == ['5000000', '5000001', '5000006',
                                                                              '5000007']  # fmt: skip
    assert dropped(filtered) == {'license_not_allowed': 8, 'exact_duplicate': 1}
