"""A small CommonCatalog-style input for trying the pipeline without downloading anything.

Writes ``<out>/commoncatalog/part-00000.parquet`` in the released CommonCatalog schema (YFCC100M license names and
URLs, Flickr ids, BLIP-2 and original captions), with images rendered by :mod:`diffusion.data.synthetic` and the
kinds of damage real crawls hold (an unknown license, a truncated JPEG, an empty image, a repeated photo), plus a
tiny random-weight BLIP-2 in ``<out>/tiny-blip2`` for the caption stage. The README's pipeline commands run on it.

    python -m diffusion.pipeline.example --out data/example
"""

from __future__ import annotations

import argparse
import io
import os
from typing import Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from diffusion.data.synthetic import render_sample

__all__ = ['COMMONCATALOG_SCHEMA', 'YFCC_LICENSES', 'write_commoncatalog', 'write_example']

#: The released CommonCatalog's columns (YFCC100M Flickr metadata plus BLIP-2 captions), in its types; the one
#: definition that the example, the tests' inputs and the pipeline benchmarks write.
COMMONCATALOG_SCHEMA = pa.schema(
    [
        ('jpg', pa.binary()),
        ('blip2_caption', pa.string()),
        ('caption', pa.string()),
        ('title', pa.string()),
        ('description', pa.string()),
        ('licensename', pa.string()),
        ('licenseurl', pa.string()),
        ('width', pa.int64()),
        ('height', pa.int64()),
        ('original_width', pa.int64()),
        ('original_height', pa.int64()),
        ('photoid', pa.int64()),
        ('uid', pa.string()),
        ('usertags', pa.string()),
        ('exif', pa.string()),
        ('sha256', pa.string()),
    ]
)

# (licensename, licenseurl) as YFCC100M spells them; CommonCatalog carries these through.
YFCC_LICENSES = (
    ('Attribution License', 'http://creativecommons.org/licenses/by/2.0/'),
    ('Attribution-ShareAlike License', 'http://creativecommons.org/licenses/by-sa/2.0/'),
    ('Attribution-NonCommercial License', 'http://creativecommons.org/licenses/by-nc/2.0/'),
    ('Attribution-NonCommercial-ShareAlike License', 'http://creativecommons.org/licenses/by-nc-sa/2.0/'),
    ('Attribution-NoDerivs License', 'http://creativecommons.org/licenses/by-nd/2.0/'),
    ('Attribution-NonCommercial-NoDerivs License', 'http://creativecommons.org/licenses/by-nc-nd/2.0/'),
)


def _row(index: int, jpg: bytes, size: int, license_index: int, caption: str) -> dict:
    name, url = YFCC_LICENSES[license_index % len(YFCC_LICENSES)]
    uid = f'{10000 + index % 9}@N0{index % 4}'
    return {
        'jpg': jpg,
        'blip2_caption': caption,
        'caption': '',
        'title': f'Example photo {index}',
        'description': 'Rendered for the pipeline example.',
        'licensename': name,
        'licenseurl': url,
        'width': size,
        'height': size,
        # CommonCatalog's images are downscaled from larger Flickr originals.
        'original_width': size * 2,
        'original_height': size * 2,
        'photoid': 5_000_000 + index,
        'uid': uid,
        'usertags': 'example,synthetic',
        'exif': '',
        'sha256': '',
    }


def write_commoncatalog(path: str, rows: Sequence[dict], row_group_size: int = 16) -> str:
    """Write ``rows`` (dicts with every column of :data:`COMMONCATALOG_SCHEMA`) to the parquet file ``path`` in
    that schema, ``row_group_size`` rows a row group; returns ``path``."""
    pq.write_table(pa.Table.from_pylist(list(rows), schema=COMMONCATALOG_SCHEMA), path, row_group_size=row_group_size)
    return path


def write_example(out: str, num_samples: int = 48, image_size: int = 384, seed: int = 0) -> str:
    """Write the example parquet file and tiny BLIP-2 under ``out``; returns the parquet path."""
    rows = []
    for index in range(num_samples):
        image, record = render_sample(index, seed=seed, image_size=image_size)
        buffer = io.BytesIO()
        image.save(buffer, format='JPEG', quality=92)
        rows.append(_row(index, buffer.getvalue(), image_size, index, record['caption']))
    damaged = [dict(rows[i]) for i in (0, 1, 2, 6)]
    damaged[0].update(licensename='All Rights Reserved', licenseurl='')
    damaged[1].update(jpg=rows[1]['jpg'][: len(rows[1]['jpg']) // 3])
    damaged[2].update(jpg=b'')
    for extra, row in enumerate(damaged):  # new photo ids; the last one repeats photo 6's bytes exactly
        row['photoid'] = 6_000_000 + extra
    rows += damaged
    path = os.path.join(out, 'commoncatalog', 'part-00000.parquet')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_commoncatalog(path, rows, row_group_size=16)

    from diffusion.pipeline.captioners import save_tiny_blip2  # transformers is slow to import; only needed here

    save_tiny_blip2(os.path.join(out, 'tiny-blip2'), seed=seed)
    return path


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', required=True)
    parser.add_argument('--num-samples', type=int, default=48)
    parser.add_argument('--image-size', type=int, default=384)
    args = parser.parse_args(argv)
    path = write_example(args.out, args.num_samples, args.image_size)
    print(f'Wrote {path} ({args.num_samples} photos + 4 damaged rows) and {args.out}/tiny-blip2')


if __name__ == '__main__':
    main()
