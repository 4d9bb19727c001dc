"""Content and perceptual hashes, and near-duplicate lookup over millions of images (ingest and filter stages).

Exact duplicates are found with :func:`content_hash` (sha256 of the bytes) and near duplicates with a 64-bit DCT
perceptual hash indexed by :class:`NearDuplicateIndex`, which uses multi-index hashing so that lookups stay cheap
over millions of images. Built on Pillow (resizing) and ``scipy.fft.dctn`` (the DCT of the perceptual hash).
Decoding and re-encoding, which the datasets share, are in :mod:`diffusion.data.images`.
"""

from __future__ import annotations

from array import array
from hashlib import sha256

import numpy as np
from PIL import Image
from scipy.fft import dctn

__all__ = ['NearDuplicateIndex', 'content_hash', 'hamming_distance', 'perceptual_hash']

# Buckets up to this size are checked in a Python loop; beyond it numpy's per-call overhead pays for itself.
_SMALL_BUCKET = 32

_BYTE_BITS = np.array([bin(i).count('1') for i in range(256)], dtype=np.uint8)


def _popcount_by_bytes(values: np.ndarray) -> np.ndarray:
    """Set bits per uint64, for numpy < 2.0 which lacks ``np.bitwise_count``."""
    return _BYTE_BITS[values.view(np.uint8)].reshape(-1, 8).sum(axis=1)


_popcount = getattr(np, 'bitwise_count', _popcount_by_bytes)


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
