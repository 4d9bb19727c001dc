"""Ingest stage: raw Creative-Commons images with metadata -> validated MDS shards with canonical licenses.

Every sample is checked before it is written: a license that cannot be normalised is never guessed (dropped as
``unknown_license``), an attribution must be present unless the work is CC0 or public domain, and the image must
decode (truncated files, zero-byte files, decompression bombs, wrong extensions are dropped under their reason).
Images are stored at ``max_side`` in ``image_format``; an image already in that format and size, with no EXIF
rotation, keeps its original bytes so it is not re-compressed. The content hash and perceptual hash computed here
let the filter stage deduplicate without decoding again.
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

from PIL import Image

from diffusion.data.images import ImageError, decode_image, downscale, encode_image
from diffusion.data.licenses import normalize_license
from diffusion.pipeline.images import content_hash, perceptual_hash
from diffusion.pipeline.runner import Drop, StageRunner
from diffusion.pipeline.sources import IMAGE_EXTENSIONS, build_source

__all__ = ['IngestOptions', 'ingest', 'ingest_sample']

# Works that need no attribution: CC0 waives it and the public domain mark has no rights holder to credit.
NO_ATTRIBUTION_NEEDED = ('CC0-1.0', 'PDM')
EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class IngestOptions:
    """How images are validated and stored.

    Args:
        max_side (int, optional): Longest side of stored images; larger ones are downscaled. Default: ``1024``.
        image_format (str): ``'jpeg'``, ``'png'`` or ``'webp'``. Default: ``'jpeg'``.
        quality (int): JPEG/WebP quality. Default: ``95``.
        max_pixels (int): Images declaring more pixels are dropped as decompression bombs. Default: ``1 << 28``.
    """

    max_side: Optional[int] = 1024
    image_format: str = 'jpeg'
    quality: int = 95
    max_pixels: int = 1 << 28


def _keeps_original_bytes(data: bytes, image: Image.Image, options: IngestOptions) -> bool:
    with Image.open(io.BytesIO(data)) as header:
        same_format = (header.format or '').lower() == options.image_format.replace('jpg', 'jpeg')
        rotated = header.getexif().get(EXIF_ORIENTATION, 1) != 1
        rgb = header.mode == 'RGB'
    small = options.max_side is None or max(image.size) <= options.max_side
    return same_format and small and rgb and not rotated


def ingest_sample(raw: dict[str, Any], options: IngestOptions) -> dict[str, Any] | Drop:
    """Validate one raw sample from a source and turn it into MDS columns, or say why it is dropped."""
    key = raw['key']
    path = raw['path'] or key
    if not raw['license']:
        return Drop('missing_field', key, path, detail='license')
    license_id = normalize_license(raw['license'], raw['license_url'])
    if license_id is None:
        detail = ' '.join(str(v) for v in (raw['license'], raw['license_url']) if v)
        return Drop('unknown_license', key, path, detail=detail)
    if not raw['attribution'] and license_id not in NO_ATTRIBUTION_NEEDED:
        return Drop('missing_field', key, path, license_id, 'attribution')
    data = raw['image']
    if data is None:
        return Drop('missing_file', key, path, license_id, 'image file not found')
    filename = path if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS else None
    try:
        image = decode_image(data, filename=filename, max_pixels=options.max_pixels)
    except ImageError as error:
        return Drop(error.reason, key, path, license_id, str(error))
    original_width, original_height = image.size
    declared = raw.get('original_width'), raw.get('original_height')
    if all(declared) and declared[0] >= original_width and declared[1] >= original_height:
        original_width, original_height = declared  # the provider downscaled the image it ships
    if _keeps_original_bytes(data, image, options):
        stored = data
    else:
        # Downscale once: the stored image and the perceptual hash (resize-invariant by design) both use it,
        # which halves the hash's cost on large photos.
        image = downscale(image, options.max_side)
        stored = encode_image(image, image_format=options.image_format, quality=options.quality)
    width, height = image.size
    return {
        'image': stored,
        'caption': raw['caption'] or '',
        'original_caption': raw['original_caption'] or '',
        'license': license_id,
        'attribution': raw['attribution'] or '',
        'source_url': raw['source_url'] or '',
        'title': raw['title'] or '',
        'width': width,
        'height': height,
        'original_width': original_width,
        'original_height': original_height,
        'key': key,
        'sha256': content_hash(data),
        'phash': f'{perceptual_hash(image):016x}',
    }


def ingest(
    source: str,
    inputs: Sequence[str],
    out: str,
    *,
    options: IngestOptions = IngestOptions(),
    unit_size: int = 1000,
    image_root: Optional[str] = None,
    **runner_kwargs: Any,
) -> StageRunner:
    """Run the ingest stage of ``source`` (see :data:`~diffusion.pipeline.sources.SOURCES`) over ``inputs``.

    ``runner_kwargs`` go to :class:`~diffusion.pipeline.runner.StageRunner` (overwrite, compression, size_limit,
    progress). Returns the runner, whose output folder then holds the merged dataset.
    """
    reader = build_source(source, inputs, unit_size=unit_size, image_root=image_root)
    settings = {
        'source': source,
        'inputs': [p if '://' in p else os.path.abspath(p) for p in inputs],
        'unit_size': unit_size,
        'image_root': image_root,
        **asdict(options),
    }
    runner = StageRunner('ingest', out, settings, **runner_kwargs)

    def process(unit: int):
        for raw in reader.read_unit(unit):
            yield raw if isinstance(raw, Drop) else ingest_sample(raw, options)

    runner.run(len(reader), process)
    return runner
