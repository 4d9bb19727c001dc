"""Data-pipeline throughput: ingest + filter + write against a plain PIL loop doing the same image work.

Generates photo-like JPEGs of a realistic size (1024x768 by default, ~200 kB each at quality 90) as a
CommonCatalog-schema parquet file, then measures side by side in one process (one core):

- ``pil loop``: read bytes, decode, downscale to ``--max-side``, encode JPEG, keep the bytes: the work that any
  pipeline must do;
- ``ingest``: ``python -m diffusion.pipeline ingest`` on the same file (adds license normalisation, SHA-256, the
  perceptual hash, MDS shards, stats and side tables);
- ``ingest + filter``: the above followed by the filter stage (dedup decisions, shard copy).

It prints images/s per core, the ratio to the PIL loop, the pipeline's overhead over it, and the cost per image of
the decode and of the perceptual hash alone.

    python benchmarks/pipeline_throughput.py                 # 200 images of 1024x768
    python benchmarks/pipeline_throughput.py --images 500 --max-side 768
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from diffusion.data.images import decode_image, downscale, encode_image
from diffusion.pipeline.example import write_commoncatalog
from diffusion.pipeline.filtering import FilterOptions, filter_dataset
from diffusion.pipeline.images import perceptual_hash
from diffusion.pipeline.ingest import IngestOptions, ingest


def photo_like(seed: int, width: int, height: int) -> bytes:
    """A JPEG with the structure of a photo: smooth regions, edges and sensor-like noise."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.float32)
    pixels += rng.normal(0, 6, pixels.shape)
    for _ in range(12):  # a few hard-edged objects
        x, y = rng.integers(0, width - 64), rng.integers(0, height - 64)
        w, h = rng.integers(32, width // 3), rng.integers(32, height // 3)
        pixels[y : y + h, x : x + w] = rng.integers(0, 256, 3)
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format='JPEG', quality=90)
    return buffer.getvalue()


def write_parquet(path: str, images: list[bytes], width: int, height: int) -> None:
    rows = [
        {
            'jpg': data,
            'blip2_caption': f'a photo number {i}',
            'caption': '',
            'title': f'photo {i}',
            'description': '',
            'licensename': 'Attribution License',
            'licenseurl': 'http://creativecommons.org/licenses/by/2.0/',
            'width': width,
            'height': height,
            'original_width': width,
            'original_height': height,
            'photoid': i,
            'uid': f'{i}@N00',
            'usertags': '',
            'exif': '',
            'sha256': '',
        }
        for i, data in enumerate(images)
    ]
    write_commoncatalog(path, rows, row_group_size=64)


def pil_loop(path: str, max_side: int) -> float:
    """Seconds for the plain loop: decode, downscale, encode each image of the parquet file, keep the bytes."""
    start = time.perf_counter()
    kept = []
    for batch in pq.ParquetFile(path).iter_batches(batch_size=64, columns=['jpg']):
        for data in batch.column(0).to_pylist():
            image = Image.open(io.BytesIO(data)).convert('RGB')
            image.thumbnail((max_side, max_side), Image.LANCZOS)
            buffer = io.BytesIO()
            image.save(buffer, format='JPEG', quality=95)
            kept.append(buffer.getvalue())
    return time.perf_counter() - start


def per_image_costs(images: list[bytes], max_side: int) -> dict[str, float]:
    """Milliseconds per image of each step of ingest's image work, in its order."""
    steps = ('decode', 'downscale', 'perceptual hash', 'encode')
    totals = dict.fromkeys(steps, 0.0)
    for data in images:
        ticks = [time.perf_counter()]
        image = decode_image(data)
        ticks.append(time.perf_counter())
        image = downscale(image, max_side)
        ticks.append(time.perf_counter())
        perceptual_hash(image)
        ticks.append(time.perf_counter())
        encode_image(image)
        ticks.append(time.perf_counter())
        for step, start, end in zip(steps, ticks, ticks[1:]):
            totals[step] += end - start
    return {step: 1000 * total / len(images) for step, total in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--images', type=int, default=200)
    parser.add_argument('--width', type=int, default=1024)
    parser.add_argument('--height', type=int, default=768)
    parser.add_argument('--max-side', type=int, default=512)
    parser.add_argument('--repeats', type=int, default=2, help='Best of this many runs of each case.')
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix='pipeline-bench-')
    try:
        images = [photo_like(i, args.width, args.height) for i in range(args.images)]
        parquet = os.path.join(work, 'input.parquet')
        write_parquet(parquet, images, args.width, args.height)
        mean_kb = sum(map(len, images)) / len(images) / 1024
        options = IngestOptions(max_side=args.max_side)

        def run_ingest(out: str) -> None:
            ingest('commoncatalog', [parquet], out, options=options, unit_size=100, overwrite=True, progress=False)

        def run_both(out: str) -> None:
            run_ingest(out + '-ingest')
            filter_dataset(out + '-ingest', out, options=FilterOptions(min_side=0), overwrite=True, progress=False)

        seconds = {'pil loop': min(pil_loop(parquet, args.max_side) for _ in range(args.repeats))}
        for name, case in (('ingest', run_ingest), ('ingest + filter', run_both)):
            times = []
            for repeat in range(args.repeats):
                start = time.perf_counter()
                case(os.path.join(work, f'{name.replace(" ", "")}-{repeat}'))
                times.append(time.perf_counter() - start)
            seconds[name] = min(times)
        costs = per_image_costs(images[:50], args.max_side)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    machine = f'{platform.machine()} ({os.cpu_count()} cores)'
    print(f'{args.images} JPEGs of {args.width}x{args.height} (mean {mean_kb:.0f} kB), stored at max side '
          f'{args.max_side}; one process on {machine}; best of {args.repeats}')  # fmt: skip
    print('| case | images/s per core | vs PIL loop | overhead |\n|---|---:|---:|---:|')
    base = seconds['pil loop']
    for name, value in seconds.items():
        print(f'| {name} | {args.images / value:.1f} | {base / value:.2f}x | {100 * (value / base - 1):+.0f}% |')
    print('\n| per image | ms |\n|---|---:|')
    for name, value in costs.items():
        print(f'| {name} | {value:.1f} |')


if __name__ == '__main__':
    main()
