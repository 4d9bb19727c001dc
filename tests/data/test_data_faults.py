"""Data faults: altered or missing shards fail naming the shard; unusable samples are replaced and counted."""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from composer.devices import DeviceCPU
from PIL import Image
from streaming import MDSWriter

from diffusion.data.faults import ShardDownloadError
from diffusion.data.image_caption import StreamingImageCaptionDataset, build_image_caption_dataloader
from diffusion.data.latents import StreamingLatentDataset
from diffusion.data.replaced_sample_monitor import ReplacedSampleMonitor
from diffusion.data.shard_integrity import SHARD_HASHES, ShardIntegrityError
from diffusion.data.synthetic import write_synthetic_dataset
from diffusion.pipeline.shards import OutputDataset
from tests.conftest import tiny_config


def encode(image: Image.Image, fmt: str = 'PNG') -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))


def bomb_png() -> bytes:
    """A valid 16x16 PNG whose IHDR (CRC fixed up) declares 100000 x 100000 pixels."""
    data = bytearray(encode(Image.new('RGB', (16, 16), (10, 20, 30))))
    ihdr = struct.pack('>II', 100_000, 100_000) + bytes(data[24:29])
    data[8:33] = png_chunk(b'IHDR', ihdr)
    return bytes(data)


def png_16bit_gray(value: int, size: int = 16) -> bytes:
    return encode(Image.fromarray(np.full((size, size), value, dtype=np.uint16)))


def png_16bit_rgb(rgb: tuple[int, int, int], size: int = 16) -> bytes:
    pixels = np.tile(np.array(rgb, dtype='>u2'), (size, size, 1))
    rows = b''.join(b'\x00' + row.tobytes() for row in pixels)
    header = struct.pack('>IIBBBBB', size, size, 16, 2, 0, 0, 0)  # bit depth 16, colour type 2 (RGB)
    return (
        b'\x89PNG\r\n\x1a\n'
        + png_chunk(b'IHDR', header)
        + png_chunk(b'IDAT', zlib.compress(rows))
        + png_chunk(b'IEND', b'')
    )


def solid(rgb: tuple[int, int, int], fmt: str = 'PNG') -> bytes:
    return encode(Image.new('RGB', (16, 16), rgb), fmt)


GOOD = solid((200, 30, 30))
# index -> (image bytes, caption, what __getitem__ returns: its sample index, or None when the sample itself)
BAD_SAMPLES = {
    1: (solid((30, 30, 200), 'JPEG')[:200], 'a truncated jpeg', 2),
    3: (os.urandom(300), 'random bytes', 5),
    4: (bomb_png(), 'a decompression bomb', 5),
    6: (encode(Image.new('RGB', (16, 16), (40, 185, 60)).convert('CMYK'), 'JPEG'), 'a cmyk jpeg', None),
    7: (png_16bit_gray(32896), 'a 16-bit gray png', None),
    8: (GOOD, '   ', 9),
    10: (png_16bit_rgb((50000, 1000, 30000)), 'a 16-bit rgb png', None),
    11: (b'', 'no bytes at all', 0),
}
REASONS = {1: 'truncated', 3: 'undecodable', 4: 'decompression_bomb', 8: 'empty_caption', 11: 'empty_file'}


def write_samples(out: str, samples: list[tuple[bytes, str]], **writer_kwargs) -> str:
    columns = {'image': 'bytes', 'caption': 'str', 'source_url': 'str'}
    with MDSWriter(out=out, columns=columns, hashes=list(SHARD_HASHES), **writer_kwargs) as writer:
        for index, (image, caption) in enumerate(samples):
            writer.write({'image': image, 'caption': caption, 'source_url': f'https://data.invalid/{index}'})
    return out


@pytest.fixture(scope='module')
def faulty_dataset(tmp_path_factory) -> str:
    """12 samples, those of BAD_SAMPLES unusable or unusual, the others a red square captioned ``good <i>``."""
    samples = [BAD_SAMPLES[i][:2] if i in BAD_SAMPLES else (GOOD, f'good {i}') for i in range(12)]
    return write_samples(str(tmp_path_factory.mktemp('faulty') / 'data'), samples)


def shards_of(out: str) -> list[str]:
    with open(os.path.join(out, 'index.json')) as f:
        return [shard['raw_data']['basename'] for shard in json.load(f)['shards']]


def flip_byte(path: str, offset: int) -> None:
    with open(path, 'r+b') as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def small_synthetic(out: str, **kwargs) -> str:
    """24 samples in 3 shards (about 6 kB each)."""
    return write_synthetic_dataset(out, num_samples=24, image_size=16, size_limit=6_000, progress=False, **kwargs)


# Shard hashes.


def test_every_writer_records_the_shard_hashes(tmp_path):
    out = small_synthetic(str(tmp_path / 'synthetic'))
    with open(os.path.join(out, 'index.json')) as f:
        shards = json.load(f)['shards']
    assert len(shards) == 3
    assert all(sorted(shard['raw_data']['hashes']) == list(SHARD_HASHES) for shard in shards)

    with OutputDataset(str(tmp_path / 'stage'), str(tmp_path / 'scratch')).writer(
        0, {'caption': 'str'}, compression=None, size_limit='1mb'
    ) as writer:
        writer.write({'caption': 'x'})
    with open(tmp_path / 'stage' / 'unit-000000' / 'index.json') as f:
        assert sorted(json.load(f)['shards'][0]['raw_data']['hashes']) == list(SHARD_HASHES)


def test_validate_hash_defaults_to_the_fastest_recorded_one(tmp_path, caplog):
    out = small_synthetic(str(tmp_path / 'data'))
    assert StreamingImageCaptionDataset(local=out).streams[0].validate_hash == 'xxh64'
    assert StreamingImageCaptionDataset(local=out, validate_hash='sha1').streams[0].validate_hash == 'sha1'
    assert StreamingImageCaptionDataset(local=out, validate_hash=None).streams[0].validate_hash is None
    with pytest.raises(ValueError, match="validate_hash='md5', but the shards of .* record sha1, xxh64"):
        StreamingImageCaptionDataset(local=out, validate_hash='md5')

    unhashed = str(tmp_path / 'unhashed')
    with MDSWriter(out=unhashed, columns={'image': 'bytes', 'caption': 'str'}) as writer:
        writer.write({'image': GOOD, 'caption': 'x'})
    with caplog.at_level(logging.WARNING):
        assert StreamingImageCaptionDataset(local=unhashed).streams[0].validate_hash is None
    assert 'written without hashes' in caplog.text


def test_an_altered_or_truncated_local_shard_fails_naming_it(tmp_path):
    out = small_synthetic(str(tmp_path / 'data'))
    StreamingImageCaptionDataset(local=out, resolution=16)  # clean shards pass
    shard = os.path.join(out, 'shard.00001.mds')
    flip_byte(shard, os.path.getsize(shard) // 2)
    for validate_hash in ('xxh64', 'sha1'):
        with pytest.raises(ShardIntegrityError, match=f'shard.00001.mds in {out} fails its {validate_hash} check'):
            StreamingImageCaptionDataset(local=out, validate_hash=validate_hash)
    StreamingImageCaptionDataset(local=out, verify_local_shards=False)  # the check can be turned off

    with open(shard, 'r+b') as f:
        f.truncate(100)
    with pytest.raises(ShardIntegrityError, match='shard.00001.mds in .* is 100 bytes but index.json says'):
        StreamingImageCaptionDataset(local=out, validate_hash=None)  # the size is checked even without a hash
    os.remove(shard)
    with pytest.raises(ShardIntegrityError, match='shard.00001.mds, listed in .*index.json, is missing'):
        StreamingImageCaptionDataset(local=out)


def test_a_decompressed_copy_that_differs_is_named_with_its_source(tmp_path):
    out = small_synthetic(str(tmp_path / 'data'), compression='zstd')
    dataset = StreamingImageCaptionDataset(local=out, resolution=16)
    captions = [dataset[index]['captions'] for index in range(24)]  # decompresses every shard next to its .zstd
    del dataset
    flip_byte(os.path.join(out, 'shard.00000.mds'), 100)
    with pytest.raises(ShardIntegrityError, match='shard.00000.mds in .* decompressed again from shard.00000.mds.zstd'):
        StreamingImageCaptionDataset(local=out)
    os.remove(os.path.join(out, 'shard.00000.mds'))
    assert StreamingImageCaptionDataset(local=out, resolution=16)[3]['captions'] == captions[3]


@pytest.mark.remote
def test_an_altered_cached_or_remote_shard_fails_naming_it(s3_server, tmp_path):
    import boto3

    remote, cache = 's3://test-bucket/faults/train', str(tmp_path / 'cache')
    small_synthetic(remote)
    loader = build_image_caption_dataloader(remote, local=cache, batch_size=4, resolution=16, shuffle=False)
    assert sum(len(batch['captions']) for batch in loader) == 24  # downloads and checks every shard
    del loader

    # A shard that changes in the cache is never downloaded or checked again by streaming: the start-up check is.
    cached = os.path.join(cache, 'shard.00002.mds')
    flip_byte(cached, 50)
    with pytest.raises(ShardIntegrityError, match=f'shard.00002.mds in {cache} fails its xxh64 check.*delete it'):
        StreamingImageCaptionDataset(remote=remote, local=cache)

    # A remote copy that differs from its index fails at download, naming it, and its bad copy leaves the cache.
    os.remove(cached)
    s3 = boto3.client('s3', endpoint_url=s3_server)
    body = s3.get_object(Bucket='test-bucket', Key='faults/train/shard.00002.mds')['Body'].read()
    altered = body[:50] + bytes([body[50] ^ 0xFF]) + body[51:]
    s3.put_object(Bucket='test-bucket', Key='faults/train/shard.00002.mds', Body=altered)
    dataset = StreamingImageCaptionDataset(remote=remote, local=cache, resolution=16, batch_size=4)
    with pytest.raises(ShardIntegrityError, match=f'shard.00002.mds from {remote} fails its xxh64 check'):
        list(dataset)
    assert not os.path.exists(cached)


@pytest.mark.remote
@pytest.mark.parametrize('num_workers', [0, 2])
def test_a_missing_remote_shard_fails_naming_it_after_the_retries(s3_server, tmp_path, num_workers):
    import boto3

    remote = 's3://test-bucket/missing/train'
    small_synthetic(remote)
    boto3.client('s3', endpoint_url=s3_server).delete_object(Bucket='test-bucket', Key='missing/train/shard.00001.mds')
    loader = build_image_caption_dataloader(
        remote,
        local=str(tmp_path / 'cache'),
        batch_size=4,
        resolution=16,
        shuffle=False,
        num_workers=num_workers,
        streaming_kwargs={'download_retry': 1, 'download_timeout': 5},
    )
    # Streaming alone ends the epoch early without an error (no samples at all here) and only the next epoch fails.
    message = f'Cannot download shard.00001.mds from {remote} after 1 attempt\\(s\\) \\(download_timeout=5s\\)'
    with pytest.raises(ShardDownloadError if num_workers == 0 else RuntimeError, match=message):
        list(loader)


def test_a_local_dataset_read_in_place_skips_the_per_sample_shard_bookkeeping(tmp_path, monkeypatch):
    # Streaming's prepare and ready threads take a file lock and check files for every sample; for shards read where
    # they lie, uncompressed, there is nothing to download or wait for, and the epoch must be the same without them.
    prepared: list[int] = []
    original = StreamingImageCaptionDataset.prepare_shard

    def counting(self, shard_id: int, blocking: bool = True) -> None:
        prepared.append(shard_id)
        original(self, shard_id, blocking)

    monkeypatch.setattr(StreamingImageCaptionDataset, 'prepare_shard', counting)
    out = small_synthetic(str(tmp_path / 'data'))
    options = {'local': out, 'resolution': 16, 'batch_size': 4, 'shuffle': True, 'shuffle_seed': 5, 'predownload': 4}
    dataset = StreamingImageCaptionDataset(**options)
    epoch = iter(dataset)
    in_place = [next(epoch)['captions']]
    assert dataset._iterator.ready_index == 24  # every sample ready at once, not `predownload` ahead of the loop
    in_place += [sample['captions'] for sample in epoch]
    assert len(in_place) == 24 and prepared == []

    with_threads = StreamingImageCaptionDataset(**options)
    with_threads._nothing_to_prepare = False  # streaming's own threads, as for a remote dataset
    epoch = iter(with_threads)
    walked = [next(epoch)['captions']]
    assert with_threads._iterator.ready_index <= 1 + 4 + 1  # they walk a sample at a time, predownload ahead
    walked += [sample['captions'] for sample in epoch]
    assert walked == in_place  # the same samples in the same order

    prepared.clear()
    compressed = small_synthetic(str(tmp_path / 'compressed'), compression='zstd')
    unpacked = [sample['captions'] for sample in StreamingImageCaptionDataset(**{**options, 'local': compressed})]
    assert sorted(unpacked) == sorted(in_place) and prepared  # only .zstd files: the threads decompress them

    dataset = StreamingImageCaptionDataset(**options)
    os.remove(os.path.join(out, 'shard.00001.mds'))  # after the start-up check
    with pytest.raises(ShardDownloadError, match='shard.00001.mds of the local dataset .* cannot be read'):
        list(dataset)


@pytest.mark.remote
def test_a_shard_whose_download_fails_in_another_worker_fails_here_too(s3_server, tmp_path):
    # Another DataLoader worker is downloading shard 1 (PREPARING in the node's shared memory) when this one's
    # threads reach it; its download then fails and it puts the shard back to REMOTE. Streaming's ready thread kept
    # waiting for the shard to become local, and the epoch hung; it must fail with the shard's error instead.
    import threading

    import boto3
    from streaming.base.dataset import _ShardState

    remote = 's3://test-bucket/raced/train'
    small_synthetic(remote)
    boto3.client('s3', endpoint_url=s3_server).delete_object(Bucket='test-bucket', Key='raced/train/shard.00001.mds')
    dataset = StreamingImageCaptionDataset(
        remote=remote, local=str(tmp_path / 'cache'), resolution=16, batch_size=4, shuffle=False, download_retry=1
    )
    dataset._shard_states[1] = _ShardState.PREPARING
    outcome: list[BaseException] = []

    def read_epoch() -> None:
        try:
            list(dataset)
        except BaseException as error:  # noqa: BLE001 - handed to the test's thread
            outcome.append(error)

    reader = threading.Thread(target=read_epoch, daemon=True)
    reader.start()
    reader.join(1.0)
    assert reader.is_alive()  # waiting for the other worker's download
    dataset._shard_states[1] = _ShardState.REMOTE  # which failed
    reader.join(30.0)
    if reader.is_alive():
        dataset._event.set()  # releases the stuck thread, so that the failure below does not leave it behind
        pytest.fail('The epoch still waits for a shard whose download failed in another worker.')
    assert len(outcome) == 1 and isinstance(outcome[0], ShardDownloadError)
    assert 'Cannot download shard.00001.mds' in str(outcome[0])


# Unusable samples.


def test_unusable_samples_are_replaced_by_the_next_usable_one(faulty_dataset, caplog):
    with caplog.at_level(logging.WARNING, logger='diffusion.data.faults'):
        dataset = StreamingImageCaptionDataset(local=faulty_dataset, resolution=16, crop='center')
        samples = [dataset[index] for index in range(12)]
    for index, sample in enumerate(samples):
        substitute = BAD_SAMPLES[index][2] if index in BAD_SAMPLES else None
        assert sample['sample_index'] == (index if substitute is None else substitute)
        assert sample['replaced'] == int(substitute is not None)
        if substitute is not None:
            assert sample['captions'] == f'good {substitute}'
            assert torch.equal(sample['image'], samples[substitute]['image'])
    for index, reason in REASONS.items():
        named = f'Replacing sample {index} (https://data.invalid/{index}) in shard.00000.mds'
        assert f'{named} by sample {BAD_SAMPLES[index][2]}: {reason}' in caplog.text

    # The same data, replacements included, from another instance.
    again = StreamingImageCaptionDataset(local=faulty_dataset, resolution=16, crop='center')
    for index in range(12):
        assert torch.equal(again[index]['image'], samples[index]['image'])
        assert again[index]['captions'] == samples[index]['captions']


def test_cmyk_and_16_bit_images_decode_to_their_colours(faulty_dataset):
    dataset = StreamingImageCaptionDataset(local=faulty_dataset, resolution=16, crop='center')
    rgb = [((dataset[index]['image'] + 1) * 127.5).mean(dim=(1, 2)) for index in (6, 7, 10)]
    assert torch.allclose(rgb[0], torch.tensor([40.0, 185.0, 60.0]), atol=6)  # CMYK JPEG
    assert torch.allclose(rgb[1], torch.tensor([128.0, 128.0, 128.0]), atol=1)  # 16-bit 32896 is mid gray, not white
    assert torch.allclose(rgb[2], torch.tensor([50000, 1000, 30000]) / 257, atol=1)  # 16-bit RGB


@pytest.mark.parametrize('num_workers', [0, 2])
def test_batches_keep_their_size_and_flag_the_replaced_samples(faulty_dataset, num_workers):
    loader = build_image_caption_dataloader(
        faulty_dataset, batch_size=6, resolution=16, crop='center', shuffle=False, num_workers=num_workers
    )
    batches = list(loader)
    assert [len(batch['captions']) for batch in batches] == [6, 6]
    flags = torch.cat([batch['replaced'] for batch in batches]).tolist()
    assert flags == [int(i in BAD_SAMPLES and BAD_SAMPLES[i][2] is not None) for i in range(12)]
    indices = torch.cat([batch['sample_index'] for batch in batches]).tolist()
    assert indices == [2 if i == 1 else 5 if i in (3, 4) else 9 if i == 8 else 0 if i == 11 else i for i in range(12)]


def test_too_many_unusable_samples_in_a_row_raise(faulty_dataset):
    dataset = StreamingImageCaptionDataset(local=faulty_dataset, resolution=16, max_replacement_tries=1)
    assert dataset[1]['sample_index'] == 2
    with pytest.raises(ValueError, match=r'Cannot replace sample 3 \(https://data.invalid/3\) in shard.00000.mds'):
        dataset[3]


def write_raw_captions(out: str, captions: list[bytes]) -> str:
    """Shards whose ``caption`` column (a ``str`` column, as every writer declares it) holds these raw bytes."""
    columns = {'image': 'bytes', 'caption': 'bytes', 'source_url': 'str'}
    with MDSWriter(out=out, columns=columns, hashes=list(SHARD_HASHES)) as writer:
        for index, caption in enumerate(captions):
            writer.write({'image': GOOD, 'caption': caption, 'source_url': f'https://data.invalid/{index}'})
    # The same bytes under the 'str' encoding: what a writer that skipped the UTF-8 check leaves.
    with open(os.path.join(out, 'index.json')) as f:
        index = json.load(f)
    for shard in index['shards']:
        shard['column_encodings'][shard['column_names'].index('caption')] = 'str'
    with open(os.path.join(out, 'index.json'), 'w') as f:
        json.dump(index, f)
    return out


def test_a_caption_that_is_not_utf8_is_replaced_and_named(tmp_path, caplog):
    captions = [b'good 0', 'caf\u00e9 in latin-1'.encode('latin-1'), b'good 2', b'\xff\xfe', b'good 4', b'good 5']
    out = write_raw_captions(str(tmp_path / 'data'), captions)
    with caplog.at_level(logging.WARNING, logger='diffusion.data.faults'):
        dataset = StreamingImageCaptionDataset(local=out, resolution=16, crop='center')
        samples = [dataset[index] for index in range(6)]
    assert [s['sample_index'] for s in samples] == [0, 2, 2, 4, 4, 5]
    assert [s['replaced'] for s in samples] == [0, 1, 0, 1, 0, 0]
    for index, substitute in ((1, 2), (3, 4)):
        assert (
            f'Replacing sample {index} (https://data.invalid/{index}) in shard.00000.mds by sample {substitute}: '
            f"not_utf8: column 'caption' is not UTF-8"
        ) in caplog.text
    # Counted in the batches, and the aspect-bucket path reads the sizes of such samples without failing either.
    for buckets in (None, [[16, 16]]):
        loader = build_image_caption_dataloader(out, batch_size=3, resolution=16, shuffle=False, aspect_buckets=buckets)
        assert sorted(torch.cat([batch['replaced'] for batch in loader]).tolist()) == [0, 0, 0, 0, 1, 1]


def sklearn_photo() -> bytes:
    from sklearn.datasets import load_sample_images

    return encode(Image.fromarray(load_sample_images().images[0]), 'JPEG')  # a real 427x640 photo


@pytest.fixture(scope='module')
def degenerate_dataset(tmp_path_factory) -> str:
    """A photo, a 1x1 PNG, a 16x16 square, a 200000x1 PNG (under the pixel limit), 4:1 and 20:1 strips, a square."""
    line = encode(Image.new('RGB', (200_000, 1), (90, 90, 90)))
    assert len(line) < 1000
    samples = [
        (sklearn_photo(), 'a photo'),
        (encode(Image.new('RGB', (1, 1), (200, 30, 30))), 'one pixel'),
        (GOOD, 'a small square'),
        (line, 'a line'),
        (encode(Image.new('RGB', (400, 100), (30, 200, 30))), 'a 4:1 strip'),
        (encode(Image.new('RGB', (2000, 100), (30, 30, 200))), 'a 20:1 strip'),
        (GOOD, 'a small square again'),
    ]
    return write_samples(str(tmp_path_factory.mktemp('degenerate') / 'data'), samples)


def test_tiny_and_extreme_aspect_images_are_replaced_before_decoding(degenerate_dataset, caplog, monkeypatch):
    from PIL import ImageFile

    decoded = []
    load = ImageFile.ImageFile.load

    def recording_load(image):
        decoded.append(image.size)
        return load(image)

    monkeypatch.setattr(ImageFile.ImageFile, 'load', recording_load)
    with caplog.at_level(logging.WARNING, logger='diffusion.data.faults'):
        dataset = StreamingImageCaptionDataset(local=degenerate_dataset, resolution=16, crop='center')
        samples = [dataset[index] for index in range(7)]
    assert [s['sample_index'] for s in samples] == [0, 2, 2, 4, 4, 6, 6]
    assert [s['replaced'] for s in samples] == [0, 1, 0, 1, 0, 1, 0]  # a photo, 16 px and 4:1 pass the defaults
    for index, substitute, reason in (
        (1, 2, 'too_small: 1x1 has a side under 16 px (min_image_side=16)'),
        (3, 4, 'too_small: 200000x1 has a side under 16 px (min_image_side=16)'),
        (5, 6, 'extreme_aspect_ratio: 2000x100 has an aspect ratio of 20, over 10.0 (max_image_aspect_ratio=10)'),
    ):
        named = f'Replacing sample {index} (https://data.invalid/{index}) in shard.00000.mds by sample {substitute}'
        assert f'{named}: {reason}' in caplog.text
    # Decided from the header: the 200000x1 line (0.2 GB to decode and crop to 16 px, more than 24 GB at 256 px),
    # the 1x1 and the 20:1 strip are never decoded.
    assert not {(200_000, 1), (1, 1), (2000, 100)} & set(decoded)
    assert {(640, 427), (400, 100), (16, 16)} <= set(decoded)

    # The limits are options, and counted in the batches like any replacement.
    loose = StreamingImageCaptionDataset(
        local=degenerate_dataset, resolution=16, crop='center', min_image_side=1, max_image_aspect_ratio=None
    )
    assert (loose[1]['replaced'], loose[5]['replaced']) == (0, 0)
    strict = StreamingImageCaptionDataset(
        local=degenerate_dataset, resolution=16, crop='center', min_image_side=20, max_image_aspect_ratio=3
    )
    assert [strict[index]['sample_index'] for index in range(7)] == [0] * 7
    loader = build_image_caption_dataloader(degenerate_dataset, batch_size=7, resolution=16, shuffle=False)
    assert torch.cat([batch['replaced'] for batch in loader]).tolist() == [0, 1, 0, 1, 0, 1, 0]
    with pytest.raises(ValueError, match='min_image_side must be a positive integer, got 0'):
        StreamingImageCaptionDataset(local=degenerate_dataset, min_image_side=0)
    with pytest.raises(ValueError, match='max_image_aspect_ratio must be at least 1 or None, got 0.5'):
        StreamingImageCaptionDataset(local=degenerate_dataset, max_image_aspect_ratio=0.5)


def test_latents_with_nan_are_replaced(tmp_path):
    out = str(tmp_path / 'latents')
    with MDSWriter(out=out, columns={'image_latents': 'ndarray', 'text_embeds': 'ndarray'}, hashes=['xxh64']) as w:
        for index in range(4):
            latents = np.full((4, 2, 2), index, dtype=np.float32)
            latents[0, 0, 0] = np.nan if index == 1 else latents[0, 0, 0]
            w.write({'image_latents': latents, 'text_embeds': np.zeros((3, 8), dtype=np.float32)})
    dataset = StreamingLatentDataset(local=out)
    assert (dataset[1]['sample_index'], dataset[1]['replaced']) == (2, 1)
    assert torch.equal(dataset[1]['image_latents'], torch.full((4, 2, 2), 2.0))
    assert (dataset[0]['sample_index'], dataset[0]['replaced']) == (0, 0)


# The monitor.


class RecordingLogger:
    def __init__(self):
        self.metrics: list[dict] = []

    def log_metrics(self, metrics: dict) -> None:
        self.metrics.append(metrics)


def step(monitor: ReplacedSampleMonitor, flags: list[int], logger: RecordingLogger) -> None:
    state = SimpleNamespace(batch={'replaced': torch.tensor(flags)}, device=DeviceCPU())
    monitor.after_dataloader(state, logger)
    monitor.batch_end(state, logger)


def test_the_monitor_counts_logs_and_stops_over_the_cap():
    monitor, logger = ReplacedSampleMonitor(max_replaced_fraction=0.1, min_samples=20), RecordingLogger()
    step(monitor, [1, 1, 0, 0, 0, 0, 0, 0, 0, 0], logger)  # 20% but under min_samples: no stop
    assert logger.metrics[-1] == {'data/replaced_samples': 2, 'data/replaced_fraction': 0.2}
    step(monitor, [0] * 10, logger)  # 2 of 20: at the cap, not over it
    assert logger.metrics[-1] == {'data/replaced_samples': 2, 'data/replaced_fraction': 0.1}

    resumed = ReplacedSampleMonitor(max_replaced_fraction=0.1, min_samples=20)
    resumed.load_state_dict(monitor.state_dict())
    with pytest.raises(RuntimeError, match=r'4 of the 30 training samples so far \(13.33%\) had to be replaced, more'):
        step(resumed, [1, 1] + [0] * 8, logger)
    with pytest.raises(ValueError, match='max_replaced_fraction must be in'):
        ReplacedSampleMonitor(max_replaced_fraction=2)


def test_the_monitor_counts_a_training_run(faulty_dataset, tmp_path):
    from diffusion.builders import build_trainer

    # 5 of the 12 samples are replaced: over a cap of 0.2 once 12 samples were seen, before the second batch trains.
    cfg = tiny_config(
        faulty_dataset, str(tmp_path), 'max_duration=2ba', 'train_dataloader.batch_size=6', 'save_folder=null'
    )
    trainer = build_trainer(cfg)
    monitor = ReplacedSampleMonitor(max_replaced_fraction=0.2, min_samples=12)
    trainer.state.callbacks.append(monitor)
    with pytest.raises(RuntimeError, match='5 of the 12 training samples so far'):
        trainer.fit()
    assert (monitor.replaced, monitor.seen) == (5, 12)


# The license guard of the -C (commercial) models.


def test_license_preset_stops_on_a_sample_outside_the_subset(tmp_path):
    from diffusion.data.faults import LicenseError

    out = str(tmp_path / 'latents')
    licenses = ['CC-BY-2.0', 'CC-BY-SA-2.0', 'CC-BY-NC-2.0', 'CC-BY-4.0']
    with MDSWriter(out=out, columns={'image_latents': 'ndarray', 'text_embeds': 'ndarray', 'license': 'str'}) as w:
        for license_id in licenses:
            w.write({'image_latents': np.zeros((4, 2, 2), np.float32), 'text_embeds': np.zeros((3, 8), np.float32),
                     'license': license_id})  # fmt: skip
    commercial = StreamingLatentDataset(local=out, license_preset='commercial')
    assert commercial[0]['sample_index'] == 0 and commercial[1]['sample_index'] == 1
    # Not replaced like a broken sample: the run stops, naming the sample, shard and license.
    with pytest.raises(LicenseError, match=r"sample 2 in shard\.00000\.mds has license 'CC-BY-NC-2.0', outside "
                                           r"license_preset='commercial'"):  # fmt: skip
        commercial[2]
    noncommercial = StreamingLatentDataset(local=out, license_preset='noncommercial')
    assert [noncommercial[i]['sample_index'] for i in range(4)] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="Unknown license preset 'comercial'"):
        StreamingLatentDataset(local=out, license_preset='comercial')
