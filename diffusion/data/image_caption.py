"""Image-caption training data read from MDS shards with mosaicml-streaming.

Builds on ``streaming.StreamingDataset`` (sharding across ranks and workers, shuffling, local caching of remote
shards from s3:// and other object stores, and the mid-epoch state that Composer checkpoints), through
:class:`~diffusion.data.faults.FaultTolerantStreamingDataset` (checked shards, unusable samples replaced), the
pipeline's image decoder and torchvision's transforms. Shards hold the encoded image file (``image``: PNG/JPEG
bytes, decoded here so that a bad image can be reported by sample and source), ``caption`` and the provenance
columns ``license``, ``attribution``, ``source_url``, ``width``, ``height``.

A sample becomes ``{'image': (3, R, R) float in [-1, 1], 'captions': str, 'input_ids': (77,) long,
'sample_index': int, 'replaced': int}``; the default collate stacks them into the batch dict of
:mod:`diffusion.data.batch`. A sample whose image does not decode or is degenerate (1x1, 200000x1), or whose caption
is empty, is replaced by the next usable one (``replaced = 1``; see :mod:`diffusion.data.faults`).

SDXL's micro-conditioning (Podell et al. 2023, section 2.2) adds ``cond_original_size``, ``cond_crops_coords_top_left``
and ``cond_target_size`` (each (2,) long, ``(height, width)`` or ``(top, left)``): the crop the transform really took.
With ``aspect_buckets`` (:mod:`diffusion.data.aspect_buckets`) each batch holds one bucket's shape instead of R x R.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from composer.utils import dist
from PIL import Image
from streaming import StreamingDataset
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.transforms import functional as TF
from transformers import PreTrainedTokenizerBase

from diffusion.data import images
from diffusion.data.aspect_buckets import (
    AspectBucketSampler,
    BucketedDataLoader,
    BucketIndex,
    read_sample_sizes,
    resolve_buckets,
)
from diffusion.data.faults import FaultTolerantStreamingDataset, UnusableSample
from diffusion.data.shard_integrity import AUTO
from diffusion.data.tokens import CaptionTokenizer

__all__ = [
    'SquareCrop',
    'StreamingImageCaptionDataset',
    'build_image_caption_dataloader',
    'decode_image',
    'image_transform',
    'micro_conditioning',
    'resize_and_crop',
    'resolve_source',
]

CROPS = ('random', 'center')
CAPTION_SOURCES = ('synthetic', 'original', 'mix')


def decode_image(
    data: bytes, max_pixels: int = 1 << 26, min_side: int = 1, max_aspect_ratio: Optional[float] = None
) -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image, or raise ``ImageError`` (a ``ValueError``) saying why not.

    The pipeline's decoder (:func:`diffusion.data.images.decode_image`), so that training accepts what ingest
    accepted: declared sizes above ``max_pixels`` are refused before any pixel is decoded, 16-bit samples are scaled
    to 8 bits rather than clipped, CMYK is converted, transparency is composited on white and EXIF orientation
    applied. Images with a side under ``min_side`` or an aspect ratio over ``max_aspect_ratio`` are refused from the
    header too. ``ImageError.reason`` is one of ``empty_file``, ``truncated``, ``decompression_bomb``,
    ``too_small``, ``extreme_aspect_ratio``, ``undecodable``.
    """
    return images.decode_image(data, max_pixels=max_pixels, min_side=min_side, max_aspect_ratio=max_aspect_ratio)


def image_transform(resolution: int, crop: str = 'center', random_flip: bool = False) -> transforms.Compose:
    """PIL image -> tensor (3, resolution, resolution) in [-1, 1]: resize the short side, crop, optionally flip."""
    if crop not in CROPS:
        raise ValueError(f'Unknown crop {crop!r}. Valid values: {", ".join(CROPS)}.')
    steps: list[Any] = [SquareCrop(resolution, crop)]
    if random_flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps.append(SignedPixels())
    return transforms.Compose(steps)


class SquareCrop:
    """PIL image -> ``resolution`` x ``resolution`` PIL image: torchvision's bicubic ``Resize`` of the short side,
    then its ``RandomCrop`` or ``CenterCrop``.

    An image already of that size is returned as it is, which is what those two give it (Pillow returns a copy of an
    image resized to its own size, a crop of the whole image is the image, and ``RandomCrop`` draws no number for an
    image of its own size), without their work: datasets ingested at the training size skip it for every sample.
    """

    def __init__(self, resolution: int, crop: str = 'center'):
        self.resolution = resolution
        self.resize = transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True)
        self.crop = transforms.RandomCrop(resolution) if crop == 'random' else transforms.CenterCrop(resolution)

    def __call__(self, image: Image.Image) -> Image.Image:
        if image.size == (self.resolution, self.resolution):
            return image
        return self.crop(self.resize(image))

    def __repr__(self) -> str:
        return f'{type(self).__name__}(resize={self.resize}, crop={self.crop})'


class SignedPixels:
    """RGB PIL image -> float32 tensor (3, H, W) in [-1, 1]: ``ToTensor()`` then ``Normalize([0.5], [0.5])``.

    The same float32 operations in the same order (divide by 255, subtract 0.5, divide by 0.5), so the values are
    identical, in numpy on the image's array instead of torchvision's two transforms with their checks and copies:
    this runs for every training sample on the training process, where numpy's calls cost a fifth of torch's on an
    image this small. Other modes go through torchvision.
    """

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != 'RGB':
            return TF.normalize(TF.to_tensor(image), [0.5], [0.5])
        pixels = np.asarray(image).astype(np.float32)
        pixels /= np.float32(255)
        pixels -= np.float32(0.5)
        pixels /= np.float32(0.5)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    def __repr__(self) -> str:
        return f'{type(self).__name__}()'


def resize_and_crop(
    image: Image.Image,
    height: int,
    width: int,
    crop: str = 'center',
    random_flip: bool = False,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """PIL image -> ``(3, height, width)`` tensor in [-1, 1] and the ``(top, left)`` of the crop it took.

    The image is resized (bicubic, aspect kept) to the smallest size that covers ``height`` x ``width``, then
    cropped to exactly that size, at random or in the centre. ``(top, left)`` is the crop's corner in the resized
    image; with a horizontal flip it is the corner in the flipped resized image (``left = resized_width - left -
    width``), so it stays the true offset of the pixels returned.

    Args:
        image (Image.Image): RGB image.
        height (int): Output height.
        width (int): Output width.
        crop (str): ``'random'`` or ``'center'``. Default: ``'center'``.
        random_flip (bool): Flip horizontally with probability 0.5. Default: ``False``.
        generator (torch.Generator, optional): Source of the random crop and flip; torch's global one when
            ``None``. Default: ``None``.
    """
    if crop not in CROPS:
        raise ValueError(f'Unknown crop {crop!r}. Valid values: {", ".join(CROPS)}.')
    scale = max(height / image.height, width / image.width)
    resized_height = max(height, round(image.height * scale))
    resized_width = max(width, round(image.width * scale))
    if (resized_width, resized_height) != image.size:
        image = image.resize((resized_width, resized_height), Image.BICUBIC)
    if crop == 'random':
        top = int(torch.randint(0, resized_height - height + 1, (1,), generator=generator))
        left = int(torch.randint(0, resized_width - width + 1, (1,), generator=generator))
    else:
        top, left = round((resized_height - height) / 2), round((resized_width - width) / 2)
    pixels = TF.to_tensor(image.crop((left, top, left + width, top + height)))
    if random_flip and float(torch.rand(1, generator=generator)) < 0.5:
        pixels = pixels.flip(-1)
        left = resized_width - left - width
    return (pixels * 2.0 - 1.0).clamp_(-1.0, 1.0), (top, left)


def _ends_in_signed_pixels(transform: Any) -> bool:
    """Whether ``transform`` is a ``Compose`` ending in :class:`SignedPixels`, as :func:`image_transform` builds it:
    its values on the RGB images :func:`decode_image` returns lie in [-1, 1] already. Any other transform set on the
    dataset has its output clamped."""
    steps = transform.transforms if isinstance(transform, transforms.Compose) else []
    return bool(steps) and isinstance(steps[-1], SignedPixels)


def micro_conditioning(
    sample: dict[str, Any], image_size: tuple[int, int], top_left: tuple[int, int], target_size: tuple[int, int]
) -> dict[str, tuple[int, int]]:
    """SDXL's size and crop conditioning of a sample cropped to ``target_size`` (all ``(height, width)``).

    The original size is the ``original_height``/``original_width`` columns when both are positive integers (the
    Flickr original of a CommonCatalog image, before the pipeline downscaled it), else the decoded image's size;
    ``top_left`` is the crop :func:`resize_and_crop` reports.
    """
    original = (sample.get('original_height'), sample.get('original_width'))
    if not all(isinstance(side, (int, np.integer)) and side > 0 for side in original):
        original = image_size
    return {
        'cond_original_size': (int(original[0]), int(original[1])),
        'cond_crops_coords_top_left': (int(top_left[0]), int(top_left[1])),
        'cond_target_size': (int(target_size[0]), int(target_size[1])),
    }


def resolve_source(remote: Optional[str], local: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """Read a local dataset folder in place instead of copying it into a cache.

    A ``remote`` that is a local folder and no ``local`` becomes ``local`` itself; object-store remotes keep
    streaming's default cache folder (derived from the remote) unless ``local`` is given.
    """
    if remote is not None and local is None and '://' not in remote:
        if not os.path.isfile(os.path.join(remote, 'index.json')):
            raise FileNotFoundError(f'No MDS dataset at {remote!r}: {os.path.join(remote, "index.json")} is missing.')
        return None, remote
    return remote, local


class StreamingImageCaptionDataset(FaultTolerantStreamingDataset):
    """Streaming image-caption dataset with resize, crop, flip and tokenization.

    A sample whose image fails to decode (truncated, not an image, a decompression bomb), is degenerate (a side under
    ``min_image_side``, an aspect ratio over ``max_image_aspect_ratio``) or whose caption is empty or not UTF-8 is
    replaced by the next usable sample, marked ``replaced = 1`` and named in a warning.

    Indexed by a :class:`~diffusion.data.aspect_buckets.BucketIndex` instead of an ``int``, a sample is cropped to
    the bucket's size, with its random crop and flip drawn from ``(shuffle_seed, epoch, index)``: the same in any
    DataLoader worker. Otherwise crops and flips draw from torch's global generator, as torchvision's do.

    Args:
        tokenizer (PreTrainedTokenizerBase, optional): Tokenizer for ``input_ids``; captions only when ``None``.
        resolution (int): Side of the square output image. Default: ``256``.
        crop (str): ``'random'`` or ``'center'`` crop after resizing the short side. Default: ``'random'``.
        random_flip (bool): Flip horizontally with probability 0.5. Default: ``False`` (captions may say
            "left" or "right").
        hue_jitter (float): Rotate each image's hues by a uniform draw from ``[-hue_jitter, hue_jitter]`` of the
            hue circle (torchvision's ``adjust_hue``), so that an autoencoder learns to reproduce every colour, not
            only the ones its data holds (a released VAE reproduces any colour). Not for text-to-image training:
            the captions name colours the rotated image no longer shows. ``0`` turns it off. Default: ``0.0``.
        image_key (str): Column holding the encoded image. Default: ``'image'``.
        caption_key (str): Column holding the caption. Default: ``'caption'``.
        caption_source (str): Which caption trains: ``'synthetic'`` (``caption_key``, the captioner's caption
            once the pipeline's caption stage ran), ``'original'`` (``original_caption_key``, the alt text that came
            with the image; samples without one fall back to the synthetic caption) or ``'mix'`` (the original one
            with probability ``original_caption_prob``, drawn once per sample from ``caption_seed``, so the choice
            is reproducible and the same on every rank and resume). Default: ``'synthetic'``.
        original_caption_key (str): Column holding the original caption. Default: ``'original_caption'``.
        original_caption_prob (float): Probability of the original caption with ``caption_source='mix'``.
            Default: ``0.5``.
        caption_seed (int): Seed of the per-sample draw of ``'mix'``. Default: ``0``.
        max_image_pixels (int): Largest declared image size accepted, against decompression bombs.
        min_image_side (int): Smallest width and height accepted; a smaller image (a 1x1 pixel, an icon) is
            replaced instead of being upscaled to a flat training image. Default: ``16``.
        max_image_aspect_ratio (float, optional): Largest ratio of the long side to the short one accepted; a
            longer image (a 200000x1 line, which costs hundreds of MB to decode and resize) is replaced. ``None``
            accepts any. Default: ``10`` (panoramas pass). Both are decided from the header, before decoding.
        micro_conditioning (bool): Add SDXL's ``cond_original_size`` (the ``original_height`` and
            ``original_width`` columns where positive, else the decoded image's size), ``cond_crops_coords_top_left``
            (the crop taken, see :func:`resize_and_crop`) and ``cond_target_size`` (the output size). Default:
            ``False``.
        **streaming_kwargs: Passed to :class:`~diffusion.data.faults.FaultTolerantStreamingDataset`
            (``validate_hash``, ``verify_local_shards``, ``max_replacement_tries``, ``license_preset``,
            ``allow_changed_data``) and ``StreamingDataset``
            (``remote``, ``local``, ``shuffle``, ``batch_size``, ``shuffle_seed``, ``download_retry``, ...).
    """

    def __init__(
        self,
        *,
        tokenizer: Optional[PreTrainedTokenizerBase] = None,
        resolution: int = 256,
        crop: str = 'random',
        random_flip: bool = False,
        hue_jitter: float = 0.0,
        image_key: str = 'image',
        caption_key: str = 'caption',
        caption_source: str = 'synthetic',
        original_caption_key: str = 'original_caption',
        original_caption_prob: float = 0.5,
        caption_seed: int = 0,
        max_image_pixels: int = 1 << 26,
        min_image_side: int = 16,
        max_image_aspect_ratio: Optional[float] = 10.0,
        micro_conditioning: bool = False,
        **streaming_kwargs: Any,
    ):
        transform = image_transform(resolution, crop, random_flip)  # validates crop before any streaming setup
        if isinstance(min_image_side, bool) or not isinstance(min_image_side, int) or min_image_side < 1:
            raise ValueError(f'min_image_side must be a positive integer, got {min_image_side!r}.')
        if max_image_aspect_ratio is not None and not max_image_aspect_ratio >= 1:
            raise ValueError(f'max_image_aspect_ratio must be at least 1 or None, got {max_image_aspect_ratio!r}.')
        if caption_source not in CAPTION_SOURCES:
            raise ValueError(f'Unknown caption_source {caption_source!r}. Valid values: {", ".join(CAPTION_SOURCES)}.')
        if not 0.0 <= original_caption_prob <= 1.0:
            raise ValueError(f'original_caption_prob must be in [0, 1], got {original_caption_prob}.')
        if not 0.0 <= hue_jitter <= 0.5:
            raise ValueError(f'hue_jitter must be in [0, 0.5] (a fraction of the hue circle), got {hue_jitter}.')
        super().__init__(**streaming_kwargs)
        self.tokenizer = tokenizer
        self._tokenize = CaptionTokenizer(tokenizer) if tokenizer is not None else None
        self.image_key = image_key
        self.caption_key = caption_key
        self.caption_source = caption_source
        self.original_caption_key = original_caption_key
        self.original_caption_prob = original_caption_prob
        self.caption_seed = caption_seed
        self.max_image_pixels = max_image_pixels
        self.min_image_side = min_image_side
        self.max_image_aspect_ratio = max_image_aspect_ratio
        self.transform = transform
        self.resolution = resolution
        self.crop = crop
        self.random_flip = random_flip
        self.hue_jitter = hue_jitter
        self.micro_conditioning = micro_conditioning
        self._bucket: Optional[BucketIndex] = None

    def __getitem__(self, index: Union[int, BucketIndex]) -> dict[str, Any]:
        """Sample ``index`` (or the next usable one); a :class:`BucketIndex` also sets its size and crop seed."""
        if not isinstance(index, BucketIndex):
            return super().__getitem__(index)
        # A process loads one sample at a time, so the request can wait here for load_sample (called, through the
        # replacement logic, with the index of the sample actually loaded).
        self._bucket = index
        try:
            return super().__getitem__(index.index)
        finally:
            self._bucket = None

    def load_sample(self, index: int) -> dict[str, Any]:
        """Sample ``index`` decoded, transformed and tokenized; :class:`UnusableSample` when it cannot train."""
        sample = self.get_item(index)
        for key in (self.image_key, self.caption_key):
            if key not in sample:
                raise KeyError(f'Sample {index} has no column {key!r}; columns are {sorted(sample)}.')
        source = sample.get('source_url') or sample.get('key') or None
        caption = self._pick_caption(sample, index)
        if not caption.strip():
            raise UnusableSample('empty_caption', source=source)
        try:
            image = decode_image(
                sample[self.image_key], self.max_image_pixels, self.min_image_side, self.max_image_aspect_ratio
            )
        except images.ImageError as error:
            detail = error.detail
            if error.reason == 'too_small':
                detail += f' (min_image_side={self.min_image_side})'
            elif error.reason == 'extreme_aspect_ratio':
                detail += f' (max_image_aspect_ratio={self.max_image_aspect_ratio:g})'
            raise UnusableSample(error.reason, detail, source) from error
        # Transform only a usable sample: the random crop and flip then draw the same numbers with or without
        # replacements, so the augmentations of the samples after a replaced one stay as they were.
        out = {**self._transform(image, sample, index), 'captions': caption, 'sample_index': index}
        if self._tokenize is not None:
            out['input_ids'] = self._tokenize([caption])[0]
        return out

    def _transform(self, image: Image.Image, sample: dict[str, Any], index: int) -> dict[str, Any]:
        generator = None
        if self._bucket is None and not self.micro_conditioning:
            pixels = self.transform(image)
            if not _ends_in_signed_pixels(self.transform):  # SignedPixels' values lie in [-1, 1] already
                pixels = pixels.clamp_(-1.0, 1.0)
            out = {'image': pixels}
        else:
            height, width = self.resolution, self.resolution
            if self._bucket is not None:
                height, width = self._bucket.height, self._bucket.width
                seed = np.random.SeedSequence([self.shuffle_seed, self._bucket.epoch, index]).generate_state(1)[0]
                generator = torch.Generator().manual_seed(int(seed))
            pixels, top_left = resize_and_crop(image, height, width, self.crop, self.random_flip, generator)
            out = {'image': pixels}
            if self.micro_conditioning:
                conditioning = micro_conditioning(sample, (image.height, image.width), top_left, (height, width))
                out.update({key: torch.tensor(value, dtype=torch.long) for key, value in conditioning.items()})
        if self.hue_jitter:
            # Drawn after the crop and flip, from the same source, so that they stay as without the jitter.
            factor = (2.0 * float(torch.rand(1, generator=generator)) - 1.0) * self.hue_jitter
            rotated = TF.adjust_hue((out['image'] + 1.0) / 2.0, factor)
            out['image'] = rotated.mul_(2.0).sub_(1.0).clamp_(-1.0, 1.0)
        return out

    def _pick_caption(self, sample: dict[str, Any], index: int) -> str:
        if self.caption_source == 'synthetic':
            return sample[self.caption_key]
        if self.original_caption_key not in sample:
            raise KeyError(
                f'caption_source={self.caption_source!r} needs the column {self.original_caption_key!r}; '
                f'sample {index} has {sorted(sample)}.'
            )
        original = sample[self.original_caption_key]
        if self.caption_source == 'mix':
            draw = np.random.default_rng([self.caption_seed, index]).random()
            if draw >= self.original_caption_prob:
                return sample[self.caption_key]
        return original or sample[self.caption_key]


def build_image_caption_dataloader(
    remote: Optional[str] = None,
    local: Optional[str] = None,
    *,
    batch_size: int,
    tokenizer: Optional[PreTrainedTokenizerBase] = None,
    resolution: int = 256,
    crop: str = 'random',
    random_flip: bool = False,
    hue_jitter: float = 0.0,
    shuffle: bool = True,
    shuffle_seed: int = 9176,
    image_key: str = 'image',
    caption_key: str = 'caption',
    caption_source: str = 'synthetic',
    original_caption_key: str = 'original_caption',
    original_caption_prob: float = 0.5,
    caption_seed: int = 0,
    min_image_side: int = 16,
    max_image_aspect_ratio: Optional[float] = 10.0,
    validate_hash: Optional[str] = AUTO,
    verify_local_shards: bool = True,
    max_replacement_tries: int = 100,
    license_preset: Optional[str] = None,
    allow_changed_data: bool = False,
    num_workers: int = 0,
    drop_last: bool = True,
    aspect_buckets: Optional[Union[Sequence[Sequence[int]], dict[str, Any]]] = None,
    micro_conditioning: bool = False,
    streaming_kwargs: Optional[dict[str, Any]] = None,
    dataloader_kwargs: Optional[dict[str, Any]] = None,
) -> DataLoader:
    """A DataLoader over image-caption MDS shards.

    Args:
        remote (str, optional): Dataset location: a local folder (read in place) or an object-store URL such as
            ``s3://bucket/path``.
        local (str, optional): Local cache folder for a remote dataset.
        batch_size (int): Global batch size, divided evenly across ranks.
        tokenizer (PreTrainedTokenizerBase, optional): Supplied by the trainer from the model.
        resolution, crop, random_flip, hue_jitter, image_key, caption_key, caption_source, original_caption_key,
            original_caption_prob, caption_seed, min_image_side, max_image_aspect_ratio, micro_conditioning: See
            :class:`StreamingImageCaptionDataset`.
        shuffle (bool): Shuffle samples (deterministic for ``shuffle_seed``). Default: ``True``.
        shuffle_seed (int): Seed of the shuffle (and, with ``aspect_buckets``, of random crops). Default: ``9176``.
        validate_hash, verify_local_shards, max_replacement_tries, license_preset, allow_changed_data: See
            :class:`~diffusion.data.faults.FaultTolerantStreamingDataset`.
        num_workers (int): DataLoader worker processes. Default: ``0``.
        drop_last (bool): Drop the last incomplete batch. Default: ``True``. No effect with ``aspect_buckets``,
            which train every sample once per epoch.
        aspect_buckets (list | dict, optional): ``[[height, width], ...]`` (height first; multiples of 8) or
            ``{resolution: 1024, step: 64, max_ratio: 2.0}`` for
            :func:`~diffusion.data.aspect_buckets.buckets_for`. Each sample is cropped to its nearest bucket and
            each batch is one bucket (:mod:`diffusion.data.aspect_buckets`); ``resolution`` is then unused.
            Default: ``None`` (square ``resolution`` crops).
        streaming_kwargs (dict, optional): More ``StreamingDataset`` arguments (``download_retry``, ...).
        dataloader_kwargs (dict, optional): More ``DataLoader`` arguments (``prefetch_factor``, ...).
    """
    device_batch_size = per_rank_batch_size(batch_size)
    buckets = resolve_buckets(aspect_buckets) if aspect_buckets is not None else None  # checked before any I/O
    remote, local = resolve_source(remote, local)
    dataset = StreamingImageCaptionDataset(
        remote=remote,
        local=local,
        tokenizer=tokenizer,
        resolution=resolution,
        crop=crop,
        random_flip=random_flip,
        hue_jitter=hue_jitter,
        image_key=image_key,
        caption_key=caption_key,
        caption_source=caption_source,
        original_caption_key=original_caption_key,
        original_caption_prob=original_caption_prob,
        caption_seed=caption_seed,
        min_image_side=min_image_side,
        max_image_aspect_ratio=max_image_aspect_ratio,
        shuffle=shuffle,
        shuffle_seed=shuffle_seed,
        validate_hash=validate_hash,
        verify_local_shards=verify_local_shards,
        max_replacement_tries=max_replacement_tries,
        license_preset=license_preset,
        allow_changed_data=allow_changed_data,
        micro_conditioning=micro_conditioning,
        batch_size=device_batch_size,
        **(streaming_kwargs or {}),
    )
    if buckets is None:
        return streaming_dataloader(dataset, device_batch_size, num_workers, drop_last, dataloader_kwargs)
    sampler = AspectBucketSampler(
        read_sample_sizes(dataset, image_key), buckets, device_batch_size, seed=shuffle_seed, shuffle=shuffle
    )
    dataloader_kwargs = dict(dataloader_kwargs or {})
    if num_workers > 0:
        dataloader_kwargs.setdefault('persistent_workers', True)
    dataloader_kwargs.setdefault('pin_memory', torch.cuda.is_available())
    return BucketedDataLoader(dataset, sampler, num_workers=num_workers, **dataloader_kwargs)


def per_rank_batch_size(batch_size: int) -> int:
    """The global ``batch_size`` divided by the number of ranks, which must divide it."""
    world_size = dist.get_world_size()
    if batch_size % world_size != 0:
        raise ValueError(f'batch_size {batch_size} is not divisible by the number of ranks ({world_size}).')
    return batch_size // world_size


def streaming_dataloader(
    dataset: StreamingDataset,
    device_batch_size: int,
    num_workers: int,
    drop_last: bool,
    dataloader_kwargs: Optional[dict[str, Any]] = None,
) -> DataLoader:
    """A DataLoader over a streaming dataset; persistent workers keep the stream's state between epochs."""
    dataloader_kwargs = dict(dataloader_kwargs or {})
    if num_workers > 0:
        dataloader_kwargs.setdefault('persistent_workers', True)
    return DataLoader(
        dataset,
        batch_size=device_batch_size,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        **dataloader_kwargs,
    )
