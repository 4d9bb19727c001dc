"""A synthetic, Creative-Commons-like image-caption dataset written as MDS shards.

CommonCanvas trains on Creative-Commons images with synthetic captions. For tests, demos and
smoke-training runs we need a data set with the same *shape* (image bytes, caption, licence and
provenance fields) that is small, fully reproducible and needs no download. This module draws
procedural images — one to three objects of a single shape and a single saturated colour on a
textured, low-saturation background — and captions that describe exactly those pixels. Because
the foreground colour and shape are well defined, a deterministic checker
(:mod:`diffusion.evaluation.prompt_following`) can later score whether a model trained on this data
follows its prompts.

Rendering builds on PIL ``ImageDraw`` (4x supersampled object masks, box-filtered down for
anti-aliasing) and NumPy; shards are written with ``streaming.MDSWriter`` from mosaicml-streaming,
so the output can be a local folder or a remote URL such as ``s3://bucket/prefix``, with the shard hashes that
the training datasets check.

Example:
    python -m diffusion.data.synthetic --out data/demo/train --num-samples 4000 --seed 0
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

import numpy as np
from PIL import Image, ImageDraw
from streaming import MDSWriter
from tqdm import tqdm

from diffusion.data import images
from diffusion.data.aspect_buckets import SIZE_CACHE_FILE
from diffusion.data.shard_integrity import SHARD_HASHES

__all__ = [
    'ATTRIBUTION_NAMES',
    'BACKGROUND_TONES',
    'COUNT_WORDS',
    'LICENSES',
    'LICENSE_WEIGHTS',
    'MDS_COLUMNS',
    'NEW_COLORS',
    'PALETTE',
    'SHAPES',
    'SIZES',
    'SOURCE_URL_PREFIX',
    'TEXTURES',
    'caption_corpus',
    'encode_image',
    'render_sample',
    'render_sample_with_mask',
    'write_synthetic_dataset',
]

# Saturated, hue-distinct foreground colours (HSV hue in degrees: red 0, orange 28, yellow 55,
# green 128, cyan 185, blue 227, purple 274, pink 323; saturation >= 0.7, value >= 0.7), so that a
# nearest-hue classifier can recover the colour named in the caption.
PALETTE: dict[str, tuple[int, int, int]] = {
    'red': (220, 30, 30),
    'orange': (245, 125, 20),
    'yellow': (240, 222, 20),
    'green': (40, 185, 60),
    'cyan': (20, 195, 210),
    'blue': (35, 75, 225),
    'purple': (145, 50, 215),
    'pink': (240, 70, 175),
}

# Colours the default data never shows, for teaching a trained model a new concept (``make demo-finetune``). Lime
# (HSV hue 92) sits in the widest hue gap of the palette, 37 degrees from yellow and 36 from green, with the palette's
# saturation and value, so the checker's nearest-hue vote can tell it from all eight.
NEW_COLORS: dict[str, tuple[int, int, int]] = {
    'lime': (120, 225, 30),
}

SHAPES: tuple[str, ...] = ('circle', 'square', 'triangle')

# Object extent (bounding-box side) as a fraction of the image side.
SIZES: dict[str, tuple[float, float]] = {'small': (0.25, 0.35), 'large': (0.45, 0.6)}

TEXTURES: tuple[str, ...] = ('plain', 'noisy', 'striped', 'checkered', 'gradient')

# Muted background tones. Each has HSV saturation <= 0.23; textures only *scale* these RGB values
# (which leaves saturation unchanged, and clipping at 255 only lowers it), so every background
# pixel stays well below the checker's foreground saturation threshold.
BACKGROUND_TONES: dict[str, tuple[int, int, int]] = {
    'gray': (128, 128, 128),
    'beige': (215, 202, 178),
    'slate': (96, 106, 122),
    'brown': (126, 111, 98),
    'white': (236, 236, 232),
}

COUNT_WORDS: dict[int, tuple[str, ...]] = {1: ('a', 'one'), 2: ('two',), 3: ('three',)}

# Real Creative Commons / public-domain licence identifiers (SPDX spelling), weighted roughly like
# a CC image crawl: mostly attribution-only licences, some share-alike, few NC/ND.
LICENSE_WEIGHTS: dict[str, float] = {
    'CC-BY-2.0': 0.30,
    'CC-BY-4.0': 0.14,
    'CC-BY-SA-2.0': 0.10,
    'CC-BY-SA-4.0': 0.10,
    'CC0-1.0': 0.10,
    'PDM': 0.05,
    'CC-BY-NC-2.0': 0.08,
    'CC-BY-NC-SA-2.0': 0.05,
    'CC-BY-NC-SA-4.0': 0.03,
    'CC-BY-ND-4.0': 0.03,
    'CC-BY-NC-ND-2.0': 0.02,
}
LICENSES: tuple[str, ...] = tuple(LICENSE_WEIGHTS)

# Made-up author names for the attribution field; no real people.
ATTRIBUTION_NAMES: tuple[str, ...] = (
    'Ada Quillfeather',
    'Bram Tollivane',
    'Corin Maddox-Lee',
    'Dela Voss',
    'Emeric Haldane',
    'Fenna Orlo',
    'Gus Penhallow',
    'Hira Kestrel',
    'Ivo Marchetti-Blue',
    'Juno Sallowby',
    'Kai Ferncastle',
    'Lio Vantrell',
)

# The reserved .invalid TLD (RFC 2606) guarantees these URLs never resolve to a real host.
SOURCE_URL_PREFIX = 'https://synthetic.commoncanvas.invalid/images/'

MDS_COLUMNS: dict[str, str] = {
    'image': 'bytes',
    'caption': 'str',
    'license': 'str',
    'attribution': 'str',
    'source_url': 'str',
    'width': 'int',
    'height': 'int',
}

IMAGE_FORMATS: tuple[str, ...] = ('png', 'jpeg')

_CAPTION_TEMPLATES: tuple[str, ...] = (
    '{objects} on a {texture} {tone} background',
    'an illustration of {objects} over a {texture} {tone} background',
    '{objects} against a {texture} {tone} background',
    'a simple drawing of {objects} on a {texture} {tone} background',
    '{objects}, {texture} {tone} background',
)

_SUPERSAMPLE = 4
_MIN_IMAGE_SIZE = 16
# Layout: a small margin keeps objects inside the image; a gap between objects keeps them
# separate connected components even after downsampling to half resolution.
_MARGIN_FRACTION = 0.03
_GAP_FRACTION = 0.06
_PLACEMENT_TRIES = 60
_SHRINK_FACTOR = 0.93


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    """Returns a uniformly random element of ``options`` (keeps the Python type, unlike rng.choice)."""
    return options[int(rng.integers(len(options)))]


def _texture_field(rng: np.random.Generator, texture: str, n: int) -> np.ndarray:
    """Returns an ``n x n`` multiplicative brightness field for a background texture.

    Brightness is applied as a per-pixel factor on the tone's RGB values, which keeps the tone's
    hue and saturation (the foreground/background separation relies on that).
    """
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    if texture == 'plain':
        return np.ones((n, n))
    if texture == 'noisy':
        sigma = rng.uniform(0.04, 0.09)
        return np.clip(1.0 + rng.normal(0.0, sigma, size=(n, n)), 0.7, 1.3)
    if texture == 'striped':
        period = n * rng.uniform(0.09, 0.19)
        amplitude = rng.uniform(0.08, 0.15)
        coordinate = _pick(rng, (xx, yy, xx + yy, xx - yy))
        return 1.0 + amplitude * np.where(np.sin(2 * np.pi * coordinate / period) >= 0, 1.0, -1.0)
    if texture == 'checkered':
        cell = max(2.0, n * rng.uniform(0.08, 0.16))
        amplitude = rng.uniform(0.08, 0.15)
        parity = (np.floor(xx / cell) + np.floor(yy / cell)) % 2
        return 1.0 + amplitude * (2 * parity - 1)
    if texture == 'gradient':
        angle = rng.uniform(0, 2 * np.pi)
        projection = np.cos(angle) * xx + np.sin(angle) * yy
        t = (projection - projection.min()) / max(np.ptp(projection), 1e-9)
        low, high = rng.uniform(0.7, 0.85), rng.uniform(1.05, 1.2)
        return low + (high - low) * t
    raise ValueError(f'Unknown texture {texture!r}; expected one of {TEXTURES}.')


def _layout(rng: np.random.Generator, count: int, size: str, image_size: int) -> list[tuple[float, float, float]]:
    """Places ``count`` square bounding boxes ``(x0, y0, extent)`` in image pixels without overlap.

    Boxes are separated by a small gap so that same-coloured objects stay distinct; when random
    placement keeps failing (e.g. three large objects) the extents shrink a little and we retry.
    """
    low, high = SIZES[size]
    margin = _MARGIN_FRACTION * image_size
    gap = _GAP_FRACTION * image_size
    extents = [rng.uniform(low, high) * image_size for _ in range(count)]
    if count > 1:
        # Two boxes longer than half the free side can never be separated on either axis.
        cap = (image_size - 2 * margin - gap) / 2
        extents = [min(e, cap) for e in extents]
    while True:
        for _ in range(_PLACEMENT_TRIES):
            boxes: list[tuple[float, float, float]] = []
            for extent in extents:
                x0 = rng.uniform(margin, image_size - margin - extent)
                y0 = rng.uniform(margin, image_size - margin - extent)
                if all(_separated((x0, y0, extent), other, gap) for other in boxes):
                    boxes.append((x0, y0, extent))
                else:
                    break
            if len(boxes) == count:
                return boxes
        extents = [e * _SHRINK_FACTOR for e in extents]


def _separated(a: tuple[float, float, float], b: tuple[float, float, float], gap: float) -> bool:
    """Whether two square boxes ``(x0, y0, extent)`` are at least ``gap`` apart on some axis."""
    ax, ay, ae = a
    bx, by, be = b
    return ax + ae + gap <= bx or bx + be + gap <= ax or ay + ae + gap <= by or by + be + gap <= ay


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float], point_up: bool) -> None:
    """Draws one filled shape into a supersampled ``L`` mask."""
    x0, y0, extent = (v * _SUPERSAMPLE for v in box)
    x1, y1 = x0 + extent, y0 + extent
    if shape == 'circle':
        draw.ellipse([x0, y0, x1, y1], fill=255)
    elif shape == 'square':
        draw.rectangle([x0, y0, x1, y1], fill=255)
    elif shape == 'triangle':
        apex, base = (y0, y1) if point_up else (y1, y0)
        draw.polygon([(x0, base), (x1, base), ((x0 + x1) / 2, apex)], fill=255)
    else:
        raise ValueError(f'Unknown shape {shape!r}; expected one of {SHAPES}.')


def _coverage_mask(
    rng: np.random.Generator, shape: str, boxes: list[tuple[float, float, float]], image_size: int
) -> np.ndarray:
    """Returns per-pixel object coverage in ``[0, 1]`` (anti-aliased via 4x supersampling)."""
    big = image_size * _SUPERSAMPLE
    mask = Image.new('L', (big, big), 0)
    draw = ImageDraw.Draw(mask)
    for box in boxes:
        _draw_shape(draw, shape, box, point_up=bool(rng.random() < 0.5))
    # A box filter averages each 4x4 block: exactly the fraction of the pixel the shape covers.
    small = mask.resize((image_size, image_size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64) / 255.0


def _caption(rng: np.random.Generator, count: int, size: str, color: str, shape: str, texture: str, tone: str) -> str:
    """Builds an English caption that names exactly one palette colour and one shape word."""
    # Mostly 'a' for a single object, sometimes 'one', so both phrasings appear in training.
    count_word = COUNT_WORDS[count][-1] if rng.random() < 0.2 else COUNT_WORDS[count][0]
    shape_word = shape if count == 1 else f'{shape}s'
    objects = f'{count_word} {size} {color} {shape_word}'
    template = _pick(rng, _CAPTION_TEMPLATES)
    return template.format(objects=objects, texture=texture, tone=tone)


def caption_corpus(seed: int = 0) -> list[str]:
    """One caption per object combination (count, size, colour, shape, texture, tone), in the words
    and phrasings the data set uses (3,600), without rendering images. Offline tokenizers are trained on it."""
    rng = np.random.default_rng(seed)
    return [
        _caption(rng, count, size, color, shape, texture, tone)
        for count in COUNT_WORDS
        for size in SIZES
        for color in PALETTE
        for shape in SHAPES
        for texture in TEXTURES
        for tone in BACKGROUND_TONES
    ]


def _license_fields(rng: np.random.Generator, index: int) -> dict[str, str]:
    """Draws licence, attribution and a never-resolving provenance URL for one sample."""
    weights = np.array(list(LICENSE_WEIGHTS.values()))
    license_id = LICENSES[int(rng.choice(len(LICENSES), p=weights / weights.sum()))]
    return {
        'license': license_id,
        'attribution': f'Photo by {_pick(rng, ATTRIBUTION_NAMES)}',
        'source_url': f'{SOURCE_URL_PREFIX}{index:06d}',
    }


def render_sample_with_mask(
    index: int, seed: int, image_size: int = 64, new_color: str | None = None, new_color_fraction: float = 1.0
) -> tuple[Image.Image, dict, np.ndarray]:
    """Renders one sample and also returns the per-pixel object coverage.

    Same as :func:`render_sample` (identical image and record), plus the anti-aliased coverage
    mask, which tests use to tell pure-background pixels (coverage 0) from object pixels.

    Args:
        index: Sample index within the data set.
        seed: Data-set seed; ``(seed, index)`` fully determines the sample.
        image_size: Side of the square image in pixels (at least 16).
        new_color: A key of :data:`NEW_COLORS`: the sample shows it with probability ``new_color_fraction``, else a
            palette colour. ``None`` (the default data) draws from the palette alone.
        new_color_fraction: Probability of ``new_color`` per sample, in ``[0, 1]``.

    Returns:
        ``(image, record, coverage)`` where ``coverage`` is a float ``image_size x image_size``
        array in ``[0, 1]``.

    Raises:
        ValueError: If ``index``/``seed`` are negative, ``image_size`` is below 16, or ``new_color`` is not a key of
            :data:`NEW_COLORS`.
    """
    if index < 0 or seed < 0:
        raise ValueError(f'index and seed must be non-negative, got index={index}, seed={seed}.')
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f'image_size must be >= {_MIN_IMAGE_SIZE}, got {image_size}.')
    _check_new_color(new_color, new_color_fraction)
    rng = np.random.default_rng([seed, index])

    if new_color is None:  # the default data: this draw is the only one, so its samples never change
        color = _pick(rng, tuple(PALETTE))
    else:
        color = new_color if rng.random() < new_color_fraction else _pick(rng, tuple(PALETTE))
    shape = _pick(rng, SHAPES)
    count = int(rng.integers(1, 4))
    size = _pick(rng, tuple(SIZES))
    texture = _pick(rng, TEXTURES)
    tone = _pick(rng, tuple(BACKGROUND_TONES))

    background = np.asarray(BACKGROUND_TONES[tone], dtype=np.float64)
    background = background * _texture_field(rng, texture, image_size)[..., None]
    # Scaling the object colour only changes its brightness, never its hue or saturation.
    foreground = np.asarray({**PALETTE, **NEW_COLORS}[color], dtype=np.float64) * rng.uniform(0.85, 1.0)
    coverage = _coverage_mask(rng, shape, _layout(rng, count, size, image_size), image_size)
    alpha = coverage[..., None]
    pixels = np.clip(background, 0, 255) * (1 - alpha) + foreground * alpha
    image = Image.fromarray(np.rint(pixels).astype(np.uint8))

    record = {
        'caption': _caption(rng, count, size, color, shape, texture, tone),
        'color': color,
        'shape': shape,
        'count': count,
        'size': size,
        'texture': texture,
        'tone': tone,
        **_license_fields(rng, index),
        'width': image_size,
        'height': image_size,
    }
    return image, record, coverage


def _check_new_color(new_color: str | None, fraction: float) -> None:
    if new_color is not None and new_color not in NEW_COLORS:
        raise ValueError(f'new_color {new_color!r} is not one of NEW_COLORS ({", ".join(NEW_COLORS)}).')
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f'new_color_fraction must be in [0, 1], got {fraction}.')


def render_sample(
    index: int, seed: int, image_size: int = 64, new_color: str | None = None, new_color_fraction: float = 1.0
) -> tuple[Image.Image, dict]:
    """Renders one synthetic image and its caption/licence record.

    The sample is a deterministic function of ``(seed, index)`` (it draws from
    ``np.random.default_rng([seed, index])``), so any sample can be re-created without reading
    the shards.

    Args:
        index: Sample index within the data set.
        seed: Data-set seed.
        image_size: Side of the square image in pixels (at least 16).
        new_color, new_color_fraction: A colour of :data:`NEW_COLORS` and how often to show it; see
            :func:`render_sample_with_mask`.

    Returns:
        ``(image, record)``: an RGB PIL image and a dict with keys ``caption, color, shape, count,
        size, texture, tone, license, attribution, source_url, width, height``.

    Raises:
        ValueError: If ``index``/``seed`` are negative or ``image_size`` is below 16.
    """
    image, record, _ = render_sample_with_mask(index, seed, image_size, new_color, new_color_fraction)
    return image, record


def encode_image(image: Image.Image, image_format: str = 'png') -> bytes:
    """Encodes a PIL image as PNG or JPEG file bytes.

    Args:
        image: The image to encode.
        image_format: ``'png'`` (lossless) or ``'jpeg'`` (quality 95).

    Returns:
        The encoded file contents.

    Raises:
        ValueError: If ``image_format`` is not one of ``('png', 'jpeg')``.
    """
    return images.encode_image(image, image_format=_normalise_format(image_format), quality=95)


def _normalise_format(image_format: str) -> str:
    fmt = image_format.lower()
    fmt = 'jpeg' if fmt == 'jpg' else fmt
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f'image_format must be one of {IMAGE_FORMATS} (or "jpg"), got {image_format!r}.')
    return fmt


def _is_remote(out: str) -> bool:
    """Whether ``out`` is a URL (``s3://``, ``gs://``, ...); the same test ``MDSWriter`` applies."""
    return urlparse(out).scheme != ''


_SHARD_FILE = re.compile(r'^(index\.json|shard\.\d+\.mds(\.\w+)?)$')


def _prepare_local_output(out: str, overwrite: bool) -> None:
    """Refuses to clobber existing data; with ``overwrite`` only an MDS data set may be replaced.

    ``MDSWriter(exist_ok=True)`` deletes the whole folder, so we only allow that when the folder
    holds nothing but an MDS index, shards and the image-size cache that bucketed training keeps
    beside them — never an arbitrary directory such as the repo root.
    """
    path = os.path.expanduser(out)
    if not os.path.isdir(path) or not os.listdir(path):
        if os.path.exists(path) and not os.path.isdir(path):
            raise FileExistsError(f'Output path {out!r} exists and is not a directory.')
        return
    entries = os.listdir(path)
    if 'index.json' not in entries:
        raise FileExistsError(
            f'Output folder {out!r} is not empty and is not an MDS data set (no index.json); '
            'refusing to write into or delete it. Choose an empty or new folder.'
        )
    if not overwrite:
        raise FileExistsError(
            f'Output folder {out!r} already holds an MDS data set (index.json). '
            'Pass overwrite=True (CLI: --overwrite) to replace it.'
        )
    unexpected = sorted(e for e in entries if not (_SHARD_FILE.match(e) or SIZE_CACHE_FILE.match(e)))
    if unexpected:
        raise FileExistsError(
            f'Output folder {out!r} holds files other than MDS shards ({unexpected[:5]}); '
            'refusing to delete them even with overwrite=True.'
        )


def write_synthetic_dataset(
    out: str,
    num_samples: int,
    seed: int = 0,
    image_size: int = 64,
    image_format: str = 'png',
    size_limit: int | str = '8mb',
    compression: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
    new_color: str | None = None,
    new_color_fraction: float = 1.0,
) -> str:
    """Renders ``num_samples`` synthetic samples and writes them as MDS shards.

    Each sample has the columns in :data:`MDS_COLUMNS`; ``image`` holds encoded PNG/JPEG *file
    bytes* (not streaming's own image encoding) so that readers decode them explicitly and can
    report decode failures. Sample ``i`` equals ``render_sample(i, seed, image_size)``.

    Args:
        out: Local folder or remote URL (e.g. ``s3://bucket/prefix``); remotes are uploaded by
            ``MDSWriter``.
        num_samples: Number of samples to write (at least 1).
        seed: Data-set seed.
        image_size: Side of the square images in pixels (at least 16).
        image_format: ``'png'`` or ``'jpeg'``.
        size_limit: Maximum shard size, as bytes or a string like ``'8mb'``.
        compression: Optional shard compression understood by streaming, e.g. ``'zstd'``.
        progress: Whether to show a tqdm progress bar.
        overwrite: Replace an existing local MDS data set at ``out``.
        new_color, new_color_fraction: Show a colour of :data:`NEW_COLORS` in this fraction of the samples (the
            rest: palette colours); see :func:`render_sample_with_mask`. Default: the palette alone.

    Returns:
        ``out``, for chaining.

    Raises:
        ValueError: On a bad ``num_samples``, ``image_size`` or ``image_format``.
        FileExistsError: If local ``out`` already holds data and ``overwrite`` is not set (or it
            holds non-MDS files, which are never deleted).
    """
    if num_samples < 1:
        raise ValueError(f'num_samples must be >= 1, got {num_samples}.')
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f'image_size must be >= {_MIN_IMAGE_SIZE}, got {image_size}.')
    fmt = _normalise_format(image_format)
    _check_new_color(new_color, new_color_fraction)
    remote = _is_remote(out)
    if not remote:
        _prepare_local_output(out, overwrite)

    writer_kwargs: dict[str, Any] = {'exist_ok': True} if overwrite and not remote else {}
    with MDSWriter(
        out=out,
        columns=MDS_COLUMNS,
        compression=compression,
        hashes=list(SHARD_HASHES),  # so that readers can tell a corrupted shard from a good one
        size_limit=size_limit,
        **writer_kwargs,
    ) as writer:
        for index in tqdm(range(num_samples), desc='synthetic samples', unit='img', disable=not progress):
            image, record = render_sample(index, seed, image_size, new_color, new_color_fraction)
            writer.write(
                {
                    'image': encode_image(image, fmt),
                    'caption': record['caption'],
                    'license': record['license'],
                    'attribution': record['attribution'],
                    'source_url': record['source_url'],
                    'width': record['width'],
                    'height': record['height'],
                }
            )
    return out


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='Write a synthetic Creative-Commons-like caption data set as MDS.')
    parser.add_argument('--out', required=True, help='Local folder or remote URL (s3://...) for the shards.')
    parser.add_argument('--num-samples', type=int, required=True, help='Number of samples to write.')
    parser.add_argument('--seed', type=int, default=0, help='Data-set seed (default 0).')
    parser.add_argument('--image-size', type=int, default=64, help='Image side in pixels (default 64).')
    parser.add_argument('--image-format', default='png', choices=('png', 'jpeg', 'jpg'), help='Encoded image format.')
    parser.add_argument('--size-limit', default='8mb', help='Maximum shard size, e.g. 8mb (default).')
    parser.add_argument('--compression', default=None, help='Optional shard compression, e.g. zstd.')
    parser.add_argument('--overwrite', action='store_true', help='Replace an existing local MDS data set.')
    parser.add_argument('--no-progress', action='store_true', help='Hide the progress bar.')
    parser.add_argument(
        '--new-color', choices=tuple(NEW_COLORS), help='A colour the default data never shows, for fine-tuning.'
    )
    parser.add_argument(
        '--new-color-fraction', type=float, default=1.0, help='Fraction of samples in --new-color (default 1).'
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point; see ``--help``.

    Raises:
        SystemExit: With status 2 and a one-line message on bad arguments or an existing output.
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        out = write_synthetic_dataset(
            args.out,
            args.num_samples,
            seed=args.seed,
            image_size=args.image_size,
            image_format=args.image_format,
            size_limit=args.size_limit,
            compression=args.compression,
            progress=not args.no_progress,
            overwrite=args.overwrite,
            new_color=args.new_color,
            new_color_fraction=args.new_color_fraction,
        )
    except (ValueError, FileExistsError) as error:
        # A user mistake, not a bug: a one-line message reads better than a traceback.
        parser.error(str(error))
    print(f'Wrote {args.num_samples} synthetic samples ({args.image_size}px, seed {args.seed}) to {out}')


if __name__ == '__main__':
    main()
