"""Tests for the synthetic Creative-Commons-like MDS data set (diffusion.data.synthetic)."""

import colorsys
import io
import itertools
import json
import os
import re

import numpy as np
import pytest
from PIL import Image
from streaming import StreamingDataset

from diffusion.data import synthetic
from diffusion.data.synthetic import (
    LICENSES,
    MDS_COLUMNS,
    PALETTE,
    SHAPES,
    SOURCE_URL_PREFIX,
    render_sample,
    render_sample_with_mask,
    write_synthetic_dataset,
)

RECORD_KEYS = {
    'caption',
    'color',
    'shape',
    'count',
    'size',
    'texture',
    'tone',
    'license',
    'attribution',
    'source_url',
    'width',
    'height',
}


def _saturation(pixels: np.ndarray) -> np.ndarray:
    """HSV saturation of an ``N x 3`` uint8 array."""
    rgb = pixels.astype(np.float64)
    high = rgb.max(axis=-1)
    return np.where(high > 0, (high - rgb.min(axis=-1)) / np.maximum(high, 1e-12), 0.0)


def _read_mds(path: str) -> list[dict]:
    dataset = StreamingDataset(local=path, shuffle=False, batch_size=1)
    samples = [dataset[i] for i in range(len(dataset))]
    del dataset
    return samples


def test_palette_is_saturated_and_hue_distinct():
    assert list(PALETTE) == ['red', 'orange', 'yellow', 'green', 'cyan', 'blue', 'purple', 'pink']
    hues = []
    for rgb in PALETTE.values():
        hue, sat, value = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
        assert sat >= 0.6 and value >= 0.6
        hues.append(hue * 360)
    for a, b in itertools.combinations(hues, 2):
        assert min(abs(a - b), 360 - abs(a - b)) >= 20


def test_render_is_deterministic_per_seed_and_index():
    image_a, record_a = render_sample(7, seed=3)
    image_b, record_b = render_sample(7, seed=3)
    assert np.array_equal(np.asarray(image_a), np.asarray(image_b))
    assert record_a == record_b
    assert not np.array_equal(np.asarray(image_a), np.asarray(render_sample(8, seed=3)[0]))
    assert not np.array_equal(np.asarray(image_a), np.asarray(render_sample(7, seed=4)[0]))


def test_images_differ_across_indices():
    arrays = [np.asarray(render_sample(i, seed=0)[0]).tobytes() for i in range(50)]
    assert len(set(arrays)) == 50


@pytest.mark.parametrize('image_size', [32, 64, 96])
def test_render_returns_rgb_image_of_requested_size(image_size):
    image, record = render_sample(0, seed=0, image_size=image_size)
    assert image.mode == 'RGB' and image.size == (image_size, image_size)
    assert record['width'] == record['height'] == image_size


def test_records_and_captions_describe_the_sample():
    shape_words = {s: s for s in SHAPES} | {f'{s}s': s for s in SHAPES}
    seen_colors, seen_shapes, seen_counts = set(), set(), set()
    for index in range(300):
        _, record = render_sample(index, seed=1)
        assert set(record) == RECORD_KEYS
        words = re.findall(r'[a-z]+', record['caption'].lower())
        colors = [w for w in words if w in PALETTE]
        shapes = [w for w in words if w in shape_words]
        assert colors == [record['color']], record['caption']
        assert len(shapes) == 1 and shape_words[shapes[0]] == record['shape'], record['caption']
        assert shapes[0].endswith('s') == (record['count'] > 1), record['caption']
        assert record['size'] in words and record['texture'] in words and record['tone'] in words
        assert record['license'] in LICENSES
        assert re.fullmatch(r'Photo by [A-Z][\w-]+ [A-Z][\w-]+', record['attribution'])
        assert record['source_url'] == f'{SOURCE_URL_PREFIX}{index:06d}'
        assert record['source_url'].startswith('https://synthetic.commoncanvas.invalid/')
        seen_colors.add(record['color'])
        seen_shapes.add(record['shape'])
        seen_counts.add(record['count'])
    assert seen_colors == set(PALETTE) and seen_shapes == set(SHAPES) and seen_counts == {1, 2, 3}


def test_background_is_low_saturation_and_objects_are_saturated_and_inside():
    for index in range(200):
        image, record, coverage = render_sample_with_mask(index, seed=2)
        pixels = np.asarray(image).reshape(-1, 3)
        flat = coverage.ravel()
        assert _saturation(pixels[flat == 0]).max() <= 0.25, record
        assert _saturation(pixels[flat == 1]).min() >= 0.6, record
        # Objects stay inside the image: nothing drawn on the outermost pixel ring.
        assert coverage[0].max() == coverage[-1].max() == coverage[:, 0].max() == coverage[:, -1].max() == 0
        fraction = coverage.mean()
        assert 0.03 <= fraction <= 0.6, (record, fraction)


def test_render_rejects_bad_arguments():
    with pytest.raises(ValueError, match='image_size'):
        render_sample(0, seed=0, image_size=8)
    with pytest.raises(ValueError, match='index'):
        render_sample(-1, seed=0)


def test_write_and_read_back_with_streaming(tmp_path):
    out = str(tmp_path / 'train')
    # A small shard limit forces several shards, exercising the index across shards.
    assert write_synthetic_dataset(out, 40, seed=5, size_limit=40_000, progress=False) == out
    index = json.loads((tmp_path / 'train' / 'index.json').read_text())
    assert len(index['shards']) > 1
    assert index['shards'][0]['column_names'] == sorted(MDS_COLUMNS)
    assert dict(zip(index['shards'][0]['column_names'], index['shards'][0]['column_encodings'])) == MDS_COLUMNS

    samples = _read_mds(out)
    assert len(samples) == 40
    for i, sample in enumerate(samples):
        assert set(sample) == set(MDS_COLUMNS)
        assert isinstance(sample['image'], bytes) and sample['image'].startswith(b'\x89PNG')
        expected_image, record = render_sample(i, seed=5)
        decoded = Image.open(io.BytesIO(sample['image']))
        assert decoded.format == 'PNG'
        assert np.array_equal(np.asarray(decoded.convert('RGB')), np.asarray(expected_image))
        for key in ('caption', 'license', 'attribution', 'source_url', 'width', 'height'):
            assert sample[key] == record[key]
        assert sample['license'] in LICENSES


def test_write_jpeg(tmp_path):
    out = str(tmp_path / 'jpeg')
    write_synthetic_dataset(out, 4, seed=0, image_format='jpeg', compression='zstd', progress=False)
    for i, sample in enumerate(_read_mds(out)):
        assert sample['image'].startswith(b'\xff\xd8')  # JPEG start-of-image marker
        decoded = np.asarray(Image.open(io.BytesIO(sample['image'])).convert('RGB'), dtype=np.float64)
        expected = np.asarray(render_sample(i, seed=0)[0], dtype=np.float64)
        # Lossy, with chroma subsampling on busy textures, but close to the rendered pixels.
        assert np.abs(decoded - expected).mean() < 10


def test_existing_dataset_requires_overwrite(tmp_path):
    out = str(tmp_path / 'ds')
    write_synthetic_dataset(out, 3, progress=False)
    with pytest.raises(FileExistsError, match='overwrite'):
        write_synthetic_dataset(out, 5, progress=False)
    write_synthetic_dataset(out, 5, progress=False, overwrite=True)
    index = json.loads((tmp_path / 'ds' / 'index.json').read_text())
    assert sum(shard['samples'] for shard in index['shards']) == 5


def test_overwrite_replaces_the_size_cache_that_bucketed_training_keeps_beside_the_data(tmp_path):
    from diffusion.data.aspect_buckets import read_sample_sizes
    from diffusion.data.image_caption import StreamingImageCaptionDataset

    out = tmp_path / 'ds'
    write_synthetic_dataset(str(out), 3, progress=False)
    read_sample_sizes(StreamingImageCaptionDataset(local=str(out)), progress=False)
    assert [name for name in os.listdir(out) if name.startswith('aspect_sizes.')]
    write_synthetic_dataset(str(out), 4, progress=False, overwrite=True)
    assert not [name for name in os.listdir(out) if name.startswith('aspect_sizes.')]
    (out / 'aspect_sizes.notes.npy').write_bytes(b'')  # not the cache's name: someone else's file
    with pytest.raises(FileExistsError, match=r"holds files other than MDS shards \(\['aspect_sizes.notes.npy'\]\)"):
        write_synthetic_dataset(str(out), 4, progress=False, overwrite=True)


def test_never_deletes_a_folder_that_is_not_an_mds_dataset(tmp_path):
    (tmp_path / 'notes.txt').write_text('keep me')
    with pytest.raises(FileExistsError, match='not an MDS data set'):
        write_synthetic_dataset(str(tmp_path), 2, progress=False, overwrite=True)
    assert (tmp_path / 'notes.txt').read_text() == 'keep me'


def test_write_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match='image_format'):
        write_synthetic_dataset(str(tmp_path / 'a'), 2, image_format='gif', progress=False)
    with pytest.raises(ValueError, match='num_samples'):
        write_synthetic_dataset(str(tmp_path / 'b'), 0, progress=False)


def test_cli(tmp_path, capsys):
    out = tmp_path / 'cli'
    synthetic.main(['--out', str(out), '--num-samples', '6', '--seed', '1', '--image-size', '32', '--no-progress'])
    assert 'Wrote 6 synthetic samples' in capsys.readouterr().out
    index = json.loads((out / 'index.json').read_text())
    assert sum(shard['samples'] for shard in index['shards']) == 6
    with pytest.raises(SystemExit) as excinfo:
        synthetic.main(['--out', str(out), '--num-samples', '6', '--no-progress'])
    assert excinfo.value.code == 2 and '--overwrite' in capsys.readouterr().err
    synthetic.main(['--out', str(out), '--num-samples', '2', '--overwrite', '--no-progress'])
