"""Tests for safe decoding and re-encoding (diffusion.data.images), hashing and near-duplicate lookup
(diffusion.pipeline.images)."""

import io
import pickle
import random
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile
from sklearn.datasets import load_sample_images

from diffusion.data.images import FAILURE_REASONS, ImageError, decode_image, encode_image
from diffusion.pipeline import images
from diffusion.pipeline.images import NearDuplicateIndex, content_hash, hamming_distance, perceptual_hash


@pytest.fixture(scope='module')
def photos():
    """china.jpg and flower.jpg (CC BY 2.0, shipped with scikit-learn) as JPEG bytes."""
    data = load_sample_images()
    return {
        name.rsplit('/', 1)[-1]: _save(Image.fromarray(array), 'JPEG', quality=95)
        for name, array in zip(data.filenames, data.images)
    }


def _save(image, fmt, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _reason(data, **kwargs):
    with pytest.raises(ImageError) as info:
        decode_image(data, **kwargs)
    assert info.value.reason in FAILURE_REASONS
    return info.value


def test_real_photos_round_trip(photos):
    assert set(photos) == {'china.jpg', 'flower.jpg'}
    for name, data in photos.items():
        image = decode_image(data, filename=name)
        assert image.mode == 'RGB' and image.size == (640, 427)
        again = decode_image(encode_image(image, quality=95), filename=name)
        assert again.size == image.size
        difference = np.abs(np.asarray(again, dtype=np.int16) - np.asarray(image, dtype=np.int16))
        assert difference.mean() < 3


def test_empty_file():
    error = _reason(b'', filename='empty.jpg')
    assert error.reason == 'empty_file'
    assert 'empty.jpg' in str(error)


def test_half_a_jpeg_is_truncated(photos):
    data = photos['china.jpg']
    error = _reason(data[: len(data) // 2], filename='china.jpg')
    assert error.reason == 'truncated'
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize('fmt', ['PNG', 'WEBP', 'GIF', 'BMP', 'TIFF'])
def test_other_formats_cut_short_are_truncated(fmt):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = _save(image.convert('P') if fmt == 'GIF' else image, fmt)
    assert _reason(data[: len(data) * 3 // 4]).reason == 'truncated'


def _bomb_png(width, height):
    """A valid 1x1 PNG whose IHDR then claims ``width`` x ``height`` (with a correct CRC)."""
    data = bytearray(_save(Image.new('RGB', (1, 1)), 'PNG'))
    assert data[12:16] == b'IHDR'
    data[16:24] = struct.pack('>II', width, height)
    data[29:33] = struct.pack('>I', zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_decompression_bomb_is_refused_before_decoding():
    data = _bomb_png(100_000, 100_000)
    assert len(data) < 100
    error = _reason(data, filename='bomb.png')
    assert error.reason == 'decompression_bomb'
    assert 'bomb.png' in str(error)
    previous = Image.MAX_IMAGE_PIXELS
    assert _reason(_bomb_png(3000, 2000), max_pixels=5_000_000).reason == 'decompression_bomb'
    assert Image.MAX_IMAGE_PIXELS == previous  # the global limit is untouched
    # Within our limit but beyond twice Pillow's default one: our limit decides, so the header passes and the next
    # check (the extension, still before any pixel is allocated) is the one that fails.
    assert _reason(_bomb_png(20_000, 10_000), filename='big.jpg').reason == 'wrong_extension'


def test_png_named_jpg_is_wrong_extension():
    data = _save(Image.new('RGB', (8, 8), 'red'), 'PNG')
    error = _reason(data, filename='photo.jpg')
    assert error.reason == 'wrong_extension'
    assert 'photo.jpg' in str(error)
    assert decode_image(data, filename='photo.PNG').size == (8, 8)
    assert decode_image(data, filename='photo.unknownext').size == (8, 8)
    assert decode_image(data).size == (8, 8)


def test_random_bytes_and_text_are_undecodable():
    noise = random.Random(0).randbytes(4096)
    assert _reason(noise, filename='noise.bin').reason == 'undecodable'
    assert _reason(b'<html>Not Found</html>\n', filename='photo.jpg').reason == 'undecodable'


def test_image_error_is_a_value_error_and_checks_its_reason():
    assert issubclass(ImageError, ValueError)
    assert str(ImageError('truncated', 'cut')) == 'truncated: cut'
    with pytest.raises(ValueError):
        ImageError('broken', 'no such reason')
    copy = pickle.loads(pickle.dumps(ImageError('truncated', 'cut', 'a.jpg')))
    assert (copy.reason, copy.filename, str(copy)) == ('truncated', 'a.jpg', 'a.jpg: truncated: cut')


@pytest.mark.parametrize(
    'image, fmt, expected',
    [
        (Image.new('RGBA', (4, 4), (255, 0, 0, 0)), 'PNG', (255, 255, 255)),  # fully transparent -> white
        (Image.new('RGBA', (4, 4), (255, 0, 0, 255)), 'PNG', (255, 0, 0)),
        (Image.new('LA', (4, 4), (0, 128)), 'PNG', (127, 127, 127)),
        (Image.new('L', (4, 4), 90), 'PNG', (90, 90, 90)),
        (Image.new('L', (4, 4), 90), 'JPEG', (90, 90, 90)),
        (Image.new('RGB', (4, 4), (0, 0, 255)).convert('P'), 'GIF', (0, 0, 255)),
        (Image.new('CMYK', (4, 4), (0, 0, 0, 0)), 'JPEG', (255, 255, 255)),
        (Image.new('1', (4, 4), 1), 'BMP', (255, 255, 255)),
        (Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)), 'PNG', (255, 255, 255)),
    ],
)
def test_every_mode_comes_out_rgb(image, fmt, expected):
    decoded = decode_image(_save(image, fmt))
    assert decoded.mode == 'RGB' and decoded.size == (4, 4)
    assert np.abs(np.asarray(decoded, dtype=int)[2, 2] - expected).max() <= 2


def test_palette_with_transparency_is_composited_on_white():
    image = Image.new('P', (4, 4), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    data = _save(image, 'PNG', transparency=1)
    assert decode_image(data).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    image = Image.new('RGB', (40, 20), 'green')
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    data = _save(image, 'JPEG', exif=exif)
    assert Image.open(io.BytesIO(data)).size == (40, 20)
    assert decode_image(data, filename='rotated.jpg').size == (20, 40)


def test_content_hash():
    assert content_hash(b'abc') == 'ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad'
    assert content_hash(b'abc') != content_hash(b'abd')


def test_perceptual_hash_survives_reencoding_and_resizing(photos):
    hashes = {}
    for name, data in photos.items():
        image = decode_image(data)
        phash = perceptual_hash(image)
        assert 0 <= phash < 1 << 64
        hashes[name] = phash
        recoded = decode_image(encode_image(image, quality=70))
        assert hamming_distance(phash, perceptual_hash(recoded)) <= 4
        half = image.resize((image.width // 2, image.height // 2), Image.Resampling.BILINEAR)
        assert hamming_distance(phash, perceptual_hash(half)) <= 4
        assert perceptual_hash(image.convert('L')) == phash  # hashed in grayscale anyway
    assert hamming_distance(hashes['china.jpg'], hashes['flower.jpg']) > 16


def test_hamming_distance():
    assert hamming_distance(0, 0) == 0
    assert hamming_distance(0b1011, 0b0001) == 2
    assert hamming_distance(0, (1 << 64) - 1) == 64


def test_near_duplicate_index_returns_the_earliest_key():
    index = NearDuplicateIndex(max_distance=4)
    base = 0x0123456789ABCDEF
    assert index.add('first', base) is None
    assert index.add('far', base ^ 0xFF) is None  # 8 bits away: new
    assert index.add('near both', base ^ 0x0F) == 'first'  # 4 bits from both: the earliest wins
    assert index.add('again', base ^ (1 << 63)) == 'first'
    assert len(index) == 2  # duplicates are not added
    assert index.find(base ^ 0xF0) == 'first'
    assert index.find(~base & ((1 << 64) - 1)) is None


def test_near_duplicate_index_distance_zero_is_exact_equality():
    index = NearDuplicateIndex(max_distance=0)
    assert index.add('a', 42) is None
    assert index.add('b', 43) is None
    assert index.add('c', 42) == 'a'
    assert index.add('d', 43) == 'b'
    assert len(index) == 2


@pytest.mark.parametrize('bad', [-1, 32, 4.0, True])
def test_near_duplicate_index_validates_max_distance(bad):
    with pytest.raises(ValueError, match='max_distance'):
        NearDuplicateIndex(max_distance=bad)


def test_near_duplicate_index_validates_hashes():
    with pytest.raises(ValueError, match='64-bit'):
        NearDuplicateIndex().add('x', 1 << 64)
    with pytest.raises(ValueError, match='64-bit'):
        NearDuplicateIndex().add('x', -1)


def _clustered_hashes(n, seed):
    """Random hashes in small clusters (copies with 0-8 flipped bits), so that near duplicates actually occur."""
    rng = random.Random(seed)
    hashes = []
    while len(hashes) < n:
        base = rng.getrandbits(64)
        for _ in range(rng.randint(1, 6)):
            flips = sum(1 << bit for bit in rng.sample(range(64), rng.randint(0, 8)))
            hashes.append(base ^ flips)
    rng.shuffle(hashes)
    return hashes[:n]


def _brute_force(hashes, max_distance):
    kept, answers = [], []
    for i, phash in enumerate(hashes):
        match = next((key for key, other in kept if hamming_distance(phash, other) <= max_distance), None)
        if match is None:
            kept.append((f'k{i}', phash))
        answers.append(match)
    return answers


@pytest.mark.parametrize('max_distance', [0, 4, 9])
def test_near_duplicate_index_matches_brute_force(max_distance):
    hashes = _clustered_hashes(20_000, seed=max_distance)
    index = NearDuplicateIndex(max_distance=max_distance)
    answers = [index.add(f'k{i}', phash) for i, phash in enumerate(hashes)]
    # Each answer depends only on earlier hashes, so the first 2000 can be checked against a quadratic scan.
    expected = _brute_force(hashes[:2000], max_distance)
    assert answers[:2000] == expected
    assert any(a is not None for a in expected) and any(a is None for a in expected)
    assert len(index) == answers.count(None)


def test_encode_image_downscales_but_never_upscales():
    image = Image.new('RGB', (1000, 500), 'blue')
    assert decode_image(encode_image(image, max_side=512)).size == (512, 256)
    assert decode_image(encode_image(image.rotate(90, expand=True), max_side=512)).size == (256, 512)
    assert decode_image(encode_image(image, max_side=2000)).size == (1000, 500)
    assert decode_image(encode_image(image)).size == (1000, 500)


@pytest.mark.parametrize('fmt, detected', [('jpeg', 'JPEG'), ('png', 'PNG'), ('webp', 'WEBP'), ('PNG', 'PNG')])
def test_encode_image_formats_decode_back_to_the_same_size(photos, fmt, detected):
    image = decode_image(photos['flower.jpg'])
    data = encode_image(image, image_format=fmt, max_side=300)
    assert Image.open(io.BytesIO(data)).format == detected
    assert decode_image(data).size == (300, 200)


def test_encode_image_converts_transparency_and_rejects_bad_arguments():
    rgba = Image.new('RGBA', (10, 10), (0, 0, 0, 0))
    assert decode_image(encode_image(rgba, image_format='png')).getpixel((5, 5)) == (255, 255, 255)
    with pytest.raises(ValueError, match="'jpeg', 'png', 'webp'|jpeg, png, webp"):
        encode_image(rgba, image_format='gif')
    with pytest.raises(ValueError, match='max_side'):
        encode_image(rgba, max_side=0)
    with pytest.raises(ValueError, match='quality'):
        encode_image(rgba, quality=0)


def test_load_truncated_images_flag_is_refused(monkeypatch, photos):
    monkeypatch.setattr(ImageFile, 'LOAD_TRUNCATED_IMAGES', True)
    with pytest.raises(RuntimeError, match='LOAD_TRUNCATED_IMAGES'):
        decode_image(photos['china.jpg'])


def test_popcount_fallback_for_old_numpy():
    values = np.array([0, 1, 0xFF00, (1 << 64) - 1, 0x8000000000000001], dtype=np.uint64)
    assert images._popcount_by_bytes(values).tolist() == [0, 1, 8, 64, 2]
