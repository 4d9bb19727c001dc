"""Safe image decoding with a named reason for each failure, content and perceptual hashes, and re-encoding.

Scraped image collections hold empty files, truncated downloads, decompression bombs and files whose extension lies
about their format. The ingest stage must drop each of them with a reason the provenance report can count, so
:func:`decode_image` raises :class:`ImageError` whose ``reason`` is one short word. Exact duplicates are found with
:func:`content_hash` (sha256 of the bytes) and near duplicates with a 64-bit DCT perceptual hash indexed by
:class:`NearDuplicateIndex`, which uses multi-index hashing so that lookups stay cheap over millions of images.
Built on Pillow (decoding, resizing, encoding) and ``scipy.fft.dctn`` (the DCT of the perceptual hash).
"""

from __future__ import annotations

import io
import os
import struct
import threading
from array import array
from hashlib import sha256

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError
from scipy.fft import dctn

__all__ = [
    'ENCODE_FORMATS',
    'FAILURE_REASONS',
    'ImageError',
    'NearDuplicateIndex',
    'content_hash',
    'decode_image',
    'downscale',
    'encode_image',
    'hamming_distance',
    'perceptual_hash',
]

FAILURE_REASONS = ('empty_file', 'truncated', 'decompression_bomb', 'wrong_extension', 'undecodable')
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
# Buckets up to this size are checked in a Python loop; beyond it numpy's per-call overhead pays for itself.
_SMALL_BUCKET = 32

_BYTE_BITS = np.array([bin(i).count('1') for i in range(256)], dtype=np.uint8)


def _popcount_by_bytes(values: np.ndarray) -> np.ndarray:
    """Set bits per uint64, for numpy < 2.0 which lacks ``np.bitwise_count``."""
    return _BYTE_BITS[values.view(np.uint8)].reshape(-1, 8).sum(axis=1)


_popcount = getattr(np, 'bitwise_count', _popcount_by_bytes)


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


def decode_image(data: bytes, *, filename: str | None = None, max_pixels: int = 1 << 28) -> Image.Image:
    """Decode image bytes into a fully loaded RGB image, upright as displayed, or say why not.

    Checks run in this order: no bytes (``empty_file``); a header Pillow cannot parse (``undecodable``, or
    ``truncated`` when the header itself is cut short); a declared ``width * height`` above ``max_pixels``
    (``decompression_bomb``, decided before any pixel is decoded); an image extension in ``filename`` that names
    another format than the one detected (``wrong_extension``); pixel data that ends early (``truncated``) or fails
    otherwise (``undecodable``).
    Animated images yield their first frame. EXIF orientation is applied, so sizes are the displayed ones.

    Args:
        data (bytes): The encoded file.
        filename (str | None): The file's name, used for the extension check and in error messages.
        max_pixels (int): Largest accepted ``width * height``.

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


def content_hash(data: bytes) -> str:
    """The sha256 hex digest of the bytes: equal digests mean byte-identical files."""
    return sha256(data).hexdigest()


def perceptual_hash(image: Image.Image) -> int:
    """64-bit DCT perceptual hash (pHash): close hashes for images that look alike after resizing or re-encoding.

    The image is turned grayscale and resized to 32x32 with LANCZOS (its low-pass filtering keeps the hash stable
    under JPEG noise and downscaling). The 8x8 lowest frequencies of its orthonormal 2-D DCT-II are compared with
    the median of their 63 AC coefficients; the DC term is left out of the median because it is the mean brightness,
    orders of magnitude larger than the rest, and says nothing about structure. Bits are packed row-major, the DC
    coefficient's bit being the most significant.

    Returns:
        int: An unsigned 64-bit integer.
    """
    pixels = np.asarray(image.convert('L').resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = dctn(pixels, type=2, norm='ortho')[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return int.from_bytes(np.packbits(bits).tobytes(), 'big')


def hamming_distance(a: int, b: int) -> int:
    """Number of differing bits between two hashes."""
    return (a ^ b).bit_count()


class NearDuplicateIndex:
    """Finds perceptual hashes within ``max_distance`` bits of an earlier one, over millions of hashes.

    Multi-index hashing: the 64 bits are split into ``max_distance + 1`` bands. If two hashes differ in at most
    ``max_distance`` bits, by the pigeonhole principle at least one band is identical in both, so only entries that
    share some band value with the query are candidates, and each candidate is verified by its exact distance.
    Buckets keep their hashes in insertion order in a compact ``array('Q')``; large buckets are verified with one
    vectorised numpy pass instead of a Python loop, which keeps a million additions at d=4 to tens of seconds.

    Args:
        max_distance (int): Largest Hamming distance that counts as a duplicate; 0 means identical hashes.
    """

    def __init__(self, max_distance: int = 4) -> None:
        if isinstance(max_distance, bool) or not isinstance(max_distance, int) or not 0 <= max_distance <= 31:
            raise ValueError(f'max_distance must be an integer in [0, 31], got {max_distance!r}.')
        self.max_distance = max_distance
        bands = max_distance + 1
        widths = [64 // bands + (1 if i < 64 % bands else 0) for i in range(bands)]
        shifts = [64 - sum(widths[: i + 1]) for i in range(bands)]
        self._bands = [(shift, (1 << width) - 1) for shift, width in zip(shifts, widths)]
        # Per band: band value -> (hashes, entry indices), both in insertion order.
        self._tables: list[dict[int, tuple[array, array]]] = [{} for _ in self._bands]
        self._keys: list[str] = []

    def __len__(self) -> int:
        return len(self._keys)

    def find(self, phash: int) -> str | None:
        """The key of the earliest added hash within ``max_distance`` of ``phash``, or None."""
        best = len(self._keys)
        limit = self.max_distance
        query = np.uint64(phash)
        for (shift, mask), table in zip(self._bands, self._tables):
            bucket = table.get((phash >> shift) & mask)
            if bucket is None:
                continue
            hashes, indices = bucket
            if len(hashes) <= _SMALL_BUCKET:
                for other, index in zip(hashes, indices):
                    if index >= best:
                        break  # indices ascend: nothing later in this bucket is earlier than what we have
                    if (phash ^ other).bit_count() <= limit:
                        best = index
                        break
            else:
                hits = np.flatnonzero(_popcount(np.frombuffer(hashes, dtype=np.uint64) ^ query) <= limit)
                if hits.size and indices[hits[0]] < best:
                    best = indices[hits[0]]
        return self._keys[best] if best < len(self._keys) else None

    def add(self, key: str, phash: int) -> str | None:
        """Add ``phash`` under ``key`` unless it is a near duplicate.

        Returns:
            str | None: The key of the earliest added entry within ``max_distance`` bits (and ``phash`` is not
            added), or None when ``phash`` was new and has been added.

        Raises:
            ValueError: If ``phash`` is not an unsigned 64-bit integer.
        """
        if isinstance(phash, bool) or not isinstance(phash, int) or not 0 <= phash < 1 << 64:
            raise ValueError(f'phash must be an unsigned 64-bit integer, got {phash!r}.')
        duplicate_of = self.find(phash)
        if duplicate_of is not None:
            return duplicate_of
        index = len(self._keys)
        self._keys.append(key)
        for (shift, mask), table in zip(self._bands, self._tables):
            value = (phash >> shift) & mask
            bucket = table.get(value)
            if bucket is None:
                table[value] = (array('Q', (phash,)), array('q', (index,)))
            else:
                bucket[0].append(phash)
                bucket[1].append(index)
        return None


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
