"""Inputs for the pipeline tests: photos, a CommonCatalog-schema parquet file, and damaged images."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from diffusion.pipeline import example

# The five YFCC licenses the tests' rows go round (the example's first five).
LICENSES = example.YFCC_LICENSES[:5]


def photo(seed: int, size: tuple[int, int] = (96, 64)) -> Image.Image:
    """A smooth random picture, distinct per seed (distinct perceptual hashes), of ``size`` (width, height)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.BICUBIC)


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format='JPEG', quality=quality)
    return buffer.getvalue()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format='PNG')
    return buffer.getvalue()


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` pixels."""
    data = bytearray(png(Image.new('RGB', (4, 4))))
    # IHDR data starts at byte 16 (8 signature + 4 length + 4 type); its CRC covers type + data.
    data[16:24] = struct.pack('>II', width, height)
    data[29:33] = struct.pack('>I', zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def commoncatalog_row(index: int, image_bytes: bytes, size: tuple[int, int], license_index: int) -> dict:
    name, url = LICENSES[license_index % len(LICENSES)]
    return {
        'jpg': image_bytes,
        'blip2_caption': f'a synthetic caption number {index}',
        'caption': f'alt text {index}',
        'title': f'Photo {index}',
        'description': '',
        'licensename': name,
        'licenseurl': url,
        'width': size[0],
        'height': size[1],
        'original_width': size[0] * 4,
        'original_height': size[1] * 4,
        'photoid': 1000 + index,
        'uid': f'{index % 7}@N0{index % 3}',
        'usertags': 'tag1,tag2',
        'exif': '',
        'sha256': '',
    }


def write_commoncatalog(path: str, rows: list[dict], row_group_size: int = 8) -> str:
    """``rows`` as a CommonCatalog parquet file, in row groups of 8 so that a small file has several."""
    return example.write_commoncatalog(path, rows, row_group_size)


@pytest.fixture
def commoncatalog_parquet(tmp_path) -> str:
    """20 rows over the five YFCC licenses, plus one unknown license, a truncated JPEG, an empty image and an exact
    duplicate (rows 20-23)."""
    rows = [commoncatalog_row(i, jpeg(photo(i)), (96, 64), i) for i in range(20)]
    unknown = commoncatalog_row(20, jpeg(photo(20)), (96, 64), 0)
    unknown.update(licensename='All Rights Reserved', licenseurl='')
    truncated = commoncatalog_row(21, jpeg(photo(21))[:300], (96, 64), 0)
    empty = commoncatalog_row(22, b'', (96, 64), 0)
    duplicate = commoncatalog_row(23, rows[0]['jpg'], (96, 64), 0)
    return write_commoncatalog(
        str(tmp_path / 'commoncatalog-00000.parquet'), [*rows, unknown, truncated, empty, duplicate]
    )


@pytest.fixture(scope='module')
def ray_cluster(module_s3_server):
    """A local Ray cluster for one test module, bounded to 2 CPUs and a small object store; stopped afterwards.

    The module's S3 server starts first, so that its variables are in the environment from the first stage to the
    last: the engine forwards them to its workers as a runtime environment, and Ray keeps worker processes per
    runtime environment, so one that changed between stages would make every stage start (and import) new workers.
    """
    ray = pytest.importorskip('ray')
    pytest.importorskip('ray.data')

    # Idle workers are kept for the module: by default Ray kills a worker idle for 1 s while the node has more
    # workers than CPUs, as it has during a model stage with its actors, and the next stage starts new workers that
    # import the stack again (about 25 s each here) instead of reusing the ones that had.
    keep_idle = {'idle_worker_killing_time_threshold_ms': 30 * 60 * 1000}
    ray.init(num_cpus=2, object_store_memory=150 * 1024**2, include_dashboard=False, log_to_driver=False,
             _system_config=keep_idle)  # fmt: skip
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
