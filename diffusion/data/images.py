"""Safe image decoding with a named reason for each failure, and re-encoding: what the datasets and the pipeline share.

Scraped image collections hold empty files, truncated downloads, decompression bombs and files whose extension lies
about their format. The ingest stage must drop each of them with a reason the provenance report can count, so
:func:`decode_image` raises :class:`ImageError` whose ``reason`` is one short word; the training datasets decode
with the same function, so training accepts what ingest accepted. :func:`encode_image` writes the stored (and the
synthetic) images. Built on Pillow. Hashing and near-duplicate lookup, which only the pipeline needs, are in
:mod:`diffusion.pipeline.images`.
"""

from __future__ import annotations

import io
import os
import struct
import threading

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

__all__ = [
    'ENCODE_FORMATS',
    'FAILURE_REASONS',
    'ImageError',
    'decode_image',
    'downscale',
    'encode_image',
]

FAILURE_REASONS = (
    'empty_file',
    'truncated',
    'decompression_bomb',
    'too_small',
    'extreme_aspect_ratio',
    'wrong_extension',
    'undecodable',
)
ENCODE_FORMATS = ('jpeg', 'png', 'webp')

# Formats Pillow may report for each extension. Cameras write multi-picture JPEGs that Pillow calls MPO.
_EXTENSION_FORMATS = {
    '.jpg': {'JPEG', 'MPO'},
    '.jpeg': {'JPEG', 'MPO'},
    '.png': {'PNG'},
    '.webp': {'WEBP'},
    '.gif': {'GIF'},
    '.bmp': {'BMP'},
    '.tif': {'TIFF'},
    '.tiff': {'TIFF'},
}
# Image.open applies its own pixel limit from a module global. We lift it only around our own header parse, under a
# lock so that concurrent calls cannot restore each other's value, and apply max_pixels ourselves instead.
_PIXEL_LIMIT_LOCK = threading.Lock()


class ImageError(ValueError):
    """An image that cannot be used, with ``reason`` one of :data:`FAILURE_REASONS`."""

    def __init__(self, reason: str, detail: str, filename: str | None = None) -> None:
        if reason not in FAILURE_REASONS:
            raise ValueError(f'Unknown image failure reason {reason!r}; expected one of {FAILURE_REASONS}.')
        self.reason = reason
        self.detail = detail
        self.filename = filename
        super().__init__(f'{filename}: {reason}: {detail}' if filename else f'{reason}: {detail}')

    def __reduce__(self) -> tuple:
        # Rebuild from the constructor's arguments so the error survives pickling between worker processes.
        return type(self), (self.reason, self.detail, self.filename)


def _riff_cut_short(data: bytes) -> bool:
    """True for a WEBP whose RIFF header declares more bytes than there are: Pillow fails those already at open."""
    if len(data) < 12 or data[:4] != b'RIFF' or data[8:12] != b'WEBP':
        return False
    return struct.unpack('<I', data[4:8])[0] + 8 > len(data)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; transparency is composited on white, as a viewer on a page would show it."""
    if image.mode == 'RGB':
        return image
    if image.mode.startswith('I') or image.mode == 'F':
        # 'I;16' / 'I' hold 16-bit samples (PNG, TIFF): scale 0-65535 to 0-255 rather than clip everything above 255.
        samples = np.asarray(image, dtype=np.float64)
        scale = 1.0 if image.mode == 'F' else 1 / 257
        image = Image.fromarray(np.clip(np.rint(samples * scale), 0, 255).astype(np.uint8), mode='L')
    has_alpha = image.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in image.info
    if not has_alpha:
        return image.convert('RGB')
    rgba = image.convert('RGBA')
    background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert('RGB')


def decode_image(
    data: bytes,
    *,
    filename: str | None = None,
    max_pixels: int = 1 << 28,
    min_side: int = 1,
    max_aspect_ratio: float | None = None,
) -> Image.Image:
    """Decode image bytes into a fully loaded RGB image, upright as displayed, or say why not.

    Checks run in this order: no bytes (``empty_file``); a header Pillow cannot parse (``undecodable``, or
    ``truncated`` when the header itself is cut short); a declared ``width * height`` above ``max_pixels``
    (``decompression_bomb``), a declared side under ``min_side`` (``too_small``) or a long side more than
    ``max_aspect_ratio`` times the short one (``extreme_aspect_ratio``), all three decided from the header before
    any pixel is decoded (a 664-byte 200000x1 PNG costs 0.2 GB to decode and crop to 16 px, and more than the
    machine has at 256 px); an image extension in ``filename`` that names
    another format than the one detected (``wrong_extension``); pixel data that ends early (``truncated``) or fails
    otherwise (``undecodable``).
    Animated images yield their first frame. EXIF orientation is applied, so sizes are the displayed ones.

    Args:
        data (bytes): The encoded file.
        filename (str | None): The file's name, used for the extension check and in error messages.
        max_pixels (int): Largest accepted ``width * height``.
        min_side (int): Smallest accepted width and height. Default: ``1`` (any).
        max_aspect_ratio (float | None): Largest accepted ratio of the long side to the short one. Default:
            ``None`` (any).

    Returns:
        Image.Image: An RGB image whose pixels are loaded.

    Raises:
        ImageError: With ``reason`` one of :data:`FAILURE_REASONS`.
        RuntimeError: If ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is enabled, since truncated files would then pass.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError('PIL.ImageFile.LOAD_TRUNCATED_IMAGES is enabled; truncated images would decode silently.')
    if not data:
        raise ImageError('empty_file', 'no bytes', filename)
    try:
        with _PIXEL_LIMIT_LOCK:
            previous = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                image = Image.open(io.BytesIO(data))
            finally:
                Image.MAX_IMAGE_PIXELS = previous
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError('decompression_bomb', str(e), filename) from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error) as e:
        # A file cut inside its header (a JPEG's markers, a WEBP's RIFF size) is a truncated download too.
        cut_short = _riff_cut_short(data) or 'truncated' in str(e).lower()
        raise ImageError('truncated' if cut_short else 'undecodable', str(e) or type(e).__name__, filename) from e

    width, height = image.size
    if width * height > max_pixels:
        raise ImageError('decompression_bomb', f'{width}x{height} exceeds {max_pixels} pixels', filename)
    if min(width, height) < min_side:
        raise ImageError('too_small', f'{width}x{height} has a side under {min_side} px', filename)
    if max_aspect_ratio is not None and max(width, height) > max_aspect_ratio * min(width, height):
        ratio = max(width, height) / min(width, height)
        raise ImageError(
            'extreme_aspect_ratio',
            f'{width}x{height} has an aspect ratio of {ratio:.4g}, over {max_aspect_ratio}',
            filename,
        )
    extension = os.path.splitext(filename)[1].lower() if filename else ''
    if extension in _EXTENSION_FORMATS and image.format not in _EXTENSION_FORMATS[extension]:
        raise ImageError('wrong_extension', f'{image.format} data named {extension}', filename)

    try:
        image.load()
        # Only orientations 2-8 move pixels; skipping the rest avoids the full copy exif_transpose would make.
        # A broken EXIF block is no reason to drop pixels that decoded fine, so it only costs the rotation.
        try:
            if image.getexif().get(ExifTags.Base.Orientation, 1) in range(2, 9):
                image = ImageOps.exif_transpose(image)
        except Exception:
            pass
        return _to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError('decompression_bomb', str(e), filename) from e
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, MemoryError) as e:
        # Pillow reports data that ends early as 'image file is truncated ...' or 'Truncated File Read'.
        reason = 'truncated' if 'truncated' in str(e).lower() else 'undecodable'
        raise ImageError(reason, str(e) or type(e).__name__, filename) from e


def downscale(image: Image.Image, max_side: int | None) -> Image.Image:
    """``image`` shrunk with LANCZOS so its longer side is at most ``max_side`` (aspect kept, never upscaled)."""
    width, height = image.size
    if max_side is None or max(width, height) <= max_side:
        return image
    scale = max_side / max(width, height)
    return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.LANCZOS)


def encode_image(
    image: Image.Image, *, image_format: str = 'jpeg', max_side: int | None = None, quality: int = 95
) -> bytes:
    """Encode an image as RGB JPEG, PNG or WEBP, first shrinking it so its longer side is at most ``max_side``.

    Args:
        image (Image.Image): Any Pillow image; it is converted to RGB (transparency on white).
        image_format (str): One of :data:`ENCODE_FORMATS`.
        max_side (int | None): Longest side after downscaling (aspect kept, LANCZOS); never upscales. None keeps
            the size.
        quality (int): JPEG/WEBP quality, 1 to 100; ignored for PNG, which is lossless.

    Raises:
        ValueError: For an unknown format, a non-positive ``max_side`` or a quality outside 1 to 100.
    """
    fmt = image_format.lower()
    if fmt not in ENCODE_FORMATS:
        raise ValueError(f'Unknown image format {image_format!r}; valid formats are {", ".join(ENCODE_FORMATS)}.')
    if max_side is not None and max_side < 1:
        raise ValueError(f'max_side must be positive, got {max_side}.')
    if not 1 <= quality <= 100:
        raise ValueError(f'quality must be in [1, 100], got {quality}.')
    image = downscale(_to_rgb(image), max_side)
    buffer = io.BytesIO()
    if fmt == 'jpeg':
        image.save(buffer, format='JPEG', quality=quality)
    elif fmt == 'webp':
        image.save(buffer, format='WEBP', quality=quality)
    else:
        image.save(buffer, format='PNG')
    return buffer.getvalue()
