"""Aspect-ratio buckets: batches of one image shape at a time, the same on every rank, each sample once per epoch.

SDXL trains on images at their own aspect ratio instead of square crops (Podell et al. 2023, "SDXL", section 2.3):
every image goes to the bucket (a ``(height, width)`` of about the base resolution's pixel count) whose aspect ratio
is nearest to its own, is resized to cover it and cropped to exactly its size, and a batch holds one bucket.

Builds on torch's batch-sampler protocol and ``streaming.StreamingDataset.get_item``. :class:`AspectBucketSampler`
yields each step's list of samples from the main process; the DataLoader hands whole lists to its workers and returns
the batches in order, so any ``num_workers`` gives the same batches. (An iterable dataset yielding whole batches
would leave the order to the round-robin of its workers and need shared memory to carry resumption state into
persistent workers, as streaming's own ``__iter__`` does.) ``get_item`` reads any sample by index, downloading and
caching its shard for ``s3://`` and other remotes.

**The plan of an epoch** is computed identically on every rank from the sample sizes, ``seed`` and the epoch:

1. Each sample goes to its nearest bucket in log aspect ratio (ties: the first in the list). A bucket holding fewer
   samples than there are ranks cannot give every rank an image: its samples move to their next-nearest bucket
   (preferring buckets that can), until none is left so small.
2. Each bucket's samples are shuffled (``np.random.default_rng([seed, epoch])``) and cut into global steps of
   ``device_batch_size * world_size`` samples. A remainder of at least ``world_size`` samples is one last, smaller
   step; a remainder smaller than that joins the bucket's last full step (so some ranks get one sample more).
3. The steps of all buckets are shuffled together, and each step is split over the ranks in order
   (``np.array_split``): every rank's batch in a step has the bucket's shape, per-rank sizes differ by one at most,
   every rank takes the same number of steps, and every sample trains exactly once per epoch (nothing dropped or
   repeated; ``drop_last`` has no effect).

The sampler counts epochs like ``StreamingDataset`` (each pass over the DataLoader is the next) and gives Composer the
``state_dict(num_samples, from_beginning)`` / ``load_state_dict`` it checkpoints, through :class:`BucketedDataset`,
so that a run resumed mid-epoch takes the remaining steps of the plan.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, Optional

import numpy as np
from composer.utils import dist
from PIL import Image
from streaming import StreamingDataset
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from diffusion.data.faults import UnusableSample
from diffusion.data.fingerprint import STATE_KEY as FINGERPRINT_KEY

__all__ = [
    'SIZE_CACHE_FILE',
    'AspectBucketSampler',
    'BucketIndex',
    'BucketedDataLoader',
    'BucketedDataset',
    'assign_buckets',
    'buckets_for',
    'plan_epoch',
    'read_sample_sizes',
    'resolve_buckets',
    'validate_buckets',
]

log = logging.getLogger(__name__)

# The VAE downsamples by 8: a bucket side that is not a multiple of it has no whole latent.
BUCKET_MULTIPLE = 8
# The image-size cache that read_sample_sizes keeps beside a local dataset (and a half-written one): derived from
# the dataset, so whatever replaces the dataset may delete it with the shards.
SIZE_CACHE_FILE = re.compile(r'^aspect_sizes\.[0-9a-f]{16}\.npy(\.\d+\.tmp)?$')


class BucketIndex(NamedTuple):
    """One sample of a bucketed batch: which sample, the bucket ``(height, width)`` it is cropped to, and the epoch
    (which seeds its random crop and flip, so that they do not depend on the DataLoader worker that loads it)."""

    index: int
    height: int
    width: int
    epoch: int


def validate_buckets(buckets: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """``buckets`` as ``(height, width)`` tuples, checked: positive sides that are multiples of 8, no duplicates.

    Raises:
        ValueError: Naming the bad bucket by its position in the list.
    """
    if isinstance(buckets, (str, bytes)) or not isinstance(buckets, Sequence) or len(buckets) == 0:
        raise ValueError(f'aspect_buckets must be a non-empty list of [height, width] pairs, got {buckets!r}.')
    checked: list[tuple[int, int]] = []
    for position, bucket in enumerate(buckets):
        where = f'aspect_buckets[{position}] = {list(bucket) if isinstance(bucket, Sequence) else bucket!r}'
        if isinstance(bucket, (str, bytes)) or not isinstance(bucket, Sequence) or len(bucket) != 2:
            raise ValueError(f'{where}: a bucket is a [height, width] pair.')
        if not all(isinstance(side, (int, np.integer)) and not isinstance(side, bool) for side in bucket):
            raise ValueError(f'{where}: height and width must be integers.')
        height, width = int(bucket[0]), int(bucket[1])
        if height <= 0 or width <= 0 or height % BUCKET_MULTIPLE or width % BUCKET_MULTIPLE:
            raise ValueError(
                f'{where}: height and width must be positive multiples of {BUCKET_MULTIPLE} (the VAE downsampling '
                f'factor), e.g. [{_round_to(height, BUCKET_MULTIPLE)}, {_round_to(width, BUCKET_MULTIPLE)}].'
            )
        if (height, width) in checked:
            raise ValueError(f'{where}: the same bucket as aspect_buckets[{checked.index((height, width))}].')
        checked.append((height, width))
    return checked


def buckets_for(resolution: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """Buckets of about ``resolution**2`` pixels with sides in multiples of ``step``, widest first.

    The short side goes down from ``resolution`` in steps of ``step``, the long side is the multiple of ``step``
    nearest to ``resolution**2 / short``, and each shape comes in both orientations while ``long / short`` stays
    within ``max_ratio``. ``buckets_for(1024)`` gives 1024x1024, 1088x960, 1152x896, 1280x832 and
    1344x768 (height x width) and their transposes.

    Args:
        resolution (int): The square bucket's side; a multiple of ``step``.
        step (int): Granularity of the sides; a multiple of 8. Default: ``64``.
        max_ratio (float): Largest long-to-short side ratio. Default: ``2.0``.
    """
    if step <= 0 or step % BUCKET_MULTIPLE:
        raise ValueError(f'step must be a positive multiple of {BUCKET_MULTIPLE}, got {step}.')
    if resolution <= 0 or resolution % step:
        raise ValueError(f'resolution must be a positive multiple of step={step}, got {resolution}.')
    if max_ratio < 1.0:
        raise ValueError(f'max_ratio must be at least 1, got {max_ratio}.')
    shapes = []
    for short in range(resolution, 0, -step):
        long = _round_to(resolution * resolution / short, step)
        if long / short > max_ratio:
            break
        shapes.append((long, short))
    buckets = {(short, long) for long, short in shapes} | set(shapes)
    return sorted(buckets, key=lambda bucket: bucket[0] / bucket[1])


def resolve_buckets(spec: Any) -> list[tuple[int, int]]:
    """Buckets from a config: a list of ``[height, width]`` pairs, or the arguments of :func:`buckets_for` as a dict
    (``{resolution: 1024, step: 64, max_ratio: 2.0}``)."""
    if isinstance(spec, dict):
        unknown = set(spec) - {'resolution', 'step', 'max_ratio'}
        if unknown or 'resolution' not in spec:
            raise ValueError(
                f'aspect_buckets as a dict takes resolution (required), step and max_ratio; got {sorted(spec)}.'
            )
        return validate_buckets(buckets_for(**spec))
    return validate_buckets(spec)


def assign_buckets(sizes: np.ndarray, buckets: Sequence[tuple[int, int]], min_count: int = 1) -> np.ndarray:
    """The bucket of each sample: the nearest in log aspect ratio, moving buckets with fewer than ``min_count``.

    Args:
        sizes (np.ndarray): (N, 2) ``(height, width)`` of each sample.
        buckets (Sequence[tuple[int, int]]): Validated ``(height, width)`` buckets.
        min_count (int): Fewest samples a bucket may hold (the number of ranks). Default: ``1``.

    Returns:
        np.ndarray: (N,) bucket positions (int16).

    Raises:
        ValueError: If there are fewer samples than ``min_count`` altogether.
    """
    sizes = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
    if len(sizes) < min_count:
        raise ValueError(f'{len(sizes)} samples cannot give each of {min_count} ranks a sample.')
    ratios = np.log(np.maximum(sizes[:, 0], 1) / np.maximum(sizes[:, 1], 1))
    bucket_ratios = np.log([height / width for height, width in buckets])
    # One bucket at a time keeps the memory at O(N) for datasets of many millions of samples.
    assigned = np.zeros(len(sizes), np.int16)
    best = np.full(len(sizes), np.inf)
    for position, bucket_ratio in enumerate(bucket_ratios):
        distance = np.abs(ratios - bucket_ratio)
        nearer = distance < best
        assigned[nearer] = position
        best[nearer] = distance[nearer]
    while True:
        counts = np.bincount(assigned, minlength=len(buckets))
        small = np.flatnonzero((counts > 0) & (counts < min_count))
        if len(small) == 0:
            return assigned
        # Empty the smallest such bucket into the nearest of the others that hold samples, preferring those with
        # enough: the number of non-empty buckets falls each time, so this ends.
        source = small[np.argmin(counts[small])]
        others = np.flatnonzero(counts > 0)
        others = others[others != source]
        enough = others[counts[others] >= min_count]
        targets = enough if len(enough) else others
        members = np.flatnonzero(assigned == source)
        distance = np.abs(ratios[members, None] - bucket_ratios[None, targets])
        assigned[members] = targets[np.argmin(distance, axis=1)]


def plan_epoch(
    assigned: np.ndarray,
    num_buckets: int,
    device_batch_size: int,
    world_size: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
) -> list[tuple[int, np.ndarray]]:
    """The global steps of one epoch: ``(bucket, sample indices of all ranks)``, in training order.

    Steps are cut as the module docstring says; rank ``r`` of a step takes ``np.array_split(indices, world_size)[r]``.
    Without ``shuffle`` the samples keep their order within a bucket and the buckets come in list order.

    Args:
        assigned (np.ndarray): (N,) bucket of each sample, from :func:`assign_buckets` with ``min_count=world_size``.
        num_buckets (int): Number of buckets.
        device_batch_size (int): Samples per rank in a full step.
        world_size (int): Number of ranks.
        seed (int): Seed of the shuffles.
        epoch (int): Epoch, mixed into the seed so that each epoch has its own order.
        shuffle (bool): Shuffle samples within buckets and the order of the steps. Default: ``True``.
    """
    rng = np.random.default_rng([seed, epoch])
    global_batch = device_batch_size * world_size
    steps: list[tuple[int, np.ndarray]] = []
    for bucket in range(num_buckets):
        members = np.flatnonzero(assigned == bucket)
        if len(members) == 0:
            continue
        assert len(members) >= world_size, 'assign_buckets(min_count=world_size) leaves no bucket this small'
        if shuffle:
            members = rng.permutation(members)
        full, remainder = divmod(len(members), global_batch)
        # A remainder too small to give every rank a sample rides along in the last full step.
        cuts = [global_batch * i for i in range(1, full + (remainder >= world_size))]
        steps += [(bucket, chunk) for chunk in np.split(members, cuts)]
    if shuffle:
        steps = [steps[i] for i in rng.permutation(len(steps))]
    return steps


class AspectBucketSampler(DistributedSampler):
    """Batch sampler of this rank's share of each step of the epoch plan (see the module docstring).

    Yields lists of :class:`BucketIndex`; counts epochs as ``StreamingDataset`` does (an iterator that gives its first
    batch starts the next epoch), follows the trainer's :meth:`set_epoch` and resumes mid-epoch from
    :meth:`load_state_dict`. It is a ``DistributedSampler`` because it is one (each rank draws its own share of a
    plan common to all ranks): Composer refuses a map-style dataset on several ranks without one, and calls its
    ``set_epoch`` at the start of each epoch. ``DistributedSampler.__init__`` is not called: its per-rank index split
    is replaced by the plan.

    Args:
        sizes (np.ndarray): (N, 2) ``(height, width)`` of every sample, the same on every rank
            (:func:`read_sample_sizes`).
        buckets (Sequence[Sequence[int]]): ``(height, width)`` buckets; validated here.
        device_batch_size (int): Samples per rank in a full step.
        seed (int): Seed of the plan's shuffles (and, through the epoch, of random crops). Default: ``9176``.
        shuffle (bool): Shuffle samples and steps. Default: ``True``.
        rank (int, optional): This rank. Default: the global rank.
        world_size (int, optional): Number of ranks. Default: the world size.
    """

    def __init__(
        self,
        sizes: np.ndarray,
        buckets: Sequence[Sequence[int]],
        device_batch_size: int,
        seed: int = 9176,
        shuffle: bool = True,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ):
        if device_batch_size <= 0:
            raise ValueError(f'device_batch_size must be positive, got {device_batch_size}.')
        self.buckets = validate_buckets(buckets)
        self.device_batch_size = device_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = dist.get_global_rank() if rank is None else rank
        self.world_size = dist.get_world_size() if world_size is None else world_size
        self.num_samples = len(sizes)
        self.assigned = assign_buckets(sizes, self.buckets, min_count=self.world_size)
        self.num_steps = len(
            plan_epoch(self.assigned, len(self.buckets), device_batch_size, self.world_size, 0, 0, shuffle=False)
        )
        self.epoch = -1  # the latest epoch started; the next is epoch + 1 unless resumed
        self._start_offset = 0  # samples of that epoch trained before it began (when resumed)
        self._finished = False  # whether it yielded its last step
        self._resume: Optional[tuple[int, int]] = None  # (epoch, samples already trained in it)
        log.info(
            'Aspect buckets (height x width: samples): %s; %d steps per epoch.',
            ', '.join(f'{h}x{w}: {n}' for (h, w), n in self.bucket_counts().items() if n),
            self.num_steps,
        )

    def __len__(self) -> int:
        return self.num_steps

    def set_epoch(self, epoch: int) -> None:
        """Make ``epoch`` the next one iterated (unless a loaded checkpoint state says where to resume)."""
        if self._resume is None:
            self.epoch = int(epoch) - 1

    def bucket_counts(self) -> dict[tuple[int, int], int]:
        """Samples per ``(height, width)`` bucket, after moving buckets too small for the ranks."""
        counts = np.bincount(self.assigned, minlength=len(self.buckets))
        return {bucket: int(count) for bucket, count in zip(self.buckets, counts)}

    def plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """The global steps of ``epoch`` (see :func:`plan_epoch`)."""
        return plan_epoch(
            self.assigned, len(self.buckets), self.device_batch_size, self.world_size, self.seed, epoch, self.shuffle
        )

    def __iter__(self) -> Iterator[list[BucketIndex]]:
        # A generator, so the epoch starts when its first batch is asked for, not at iter(): a DataLoader with
        # workers calls iter() twice when it starts and drops the first iterator unused.
        epoch, skip = self._resume if self._resume is not None else (self.epoch + 1, 0)
        self._resume = None
        self.epoch, self._start_offset, self._finished = epoch, skip, False
        steps = self.plan(epoch)
        yield from self._rank_batches(steps[_steps_done(steps, skip) :], epoch)
        self._finished = True

    def plan_batches(self, epoch: int) -> Iterator[list[BucketIndex]]:
        """This rank's batches of ``epoch``, without starting it (the sampler's state is left as it is)."""
        return self._rank_batches(self.plan(epoch), epoch)

    def _rank_batches(self, steps: list[tuple[int, np.ndarray]], epoch: int) -> Iterator[list[BucketIndex]]:
        for bucket, indices in steps:
            height, width = self.buckets[bucket]
            share = np.array_split(indices, self.world_size)[self.rank]
            yield [BucketIndex(int(index), height, width, epoch) for index in share]

    def state_dict(self, num_samples: int, from_beginning: bool = True) -> dict[str, Any]:
        """Where the epoch stands after ``num_samples`` samples (over all ranks), for a checkpoint.

        Args:
            num_samples (int): Samples trained in the current epoch, over all ranks (Composer's
                ``sample_in_epoch``), or since this run resumed when ``from_beginning`` is ``False``.
            from_beginning (bool): Whether ``num_samples`` counts from the start of the epoch. Default: ``True``.
        """
        if self._resume is not None:  # loaded and not iterated yet
            epoch, offset = self._resume
        elif self._finished and num_samples == 0:  # the epoch ended: what comes next is the following one
            epoch, offset = self.epoch + 1, 0
        else:  # within the latest epoch (epoch 0 before the first iter)
            epoch, offset = max(self.epoch, 0), self._start_offset
        return {
            'epoch': epoch,
            'sample_in_epoch': num_samples if from_beginning else offset + num_samples,
            **self._plan_settings(),
        }

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        """Resume at ``obj['epoch']`` after ``obj['sample_in_epoch']`` samples, from :meth:`state_dict`.

        Raises:
            ValueError: If the checkpoint is mid-epoch and its plan differs (other ranks, batch size, seed, buckets
                or dataset), so that the samples already trained cannot be known.
        """
        epoch, sample_in_epoch = int(obj['epoch']), int(obj['sample_in_epoch'])
        if sample_in_epoch > 0:
            for key, value in self._plan_settings().items():
                saved = obj.get(key)
                if saved is not None and _plain(saved) != _plain(value):
                    raise ValueError(
                        f'Cannot resume mid-epoch (epoch {epoch}, {sample_in_epoch} samples in): the checkpoint was '
                        f'taken with {key}={_plain(saved)} and this run has {key}={_plain(value)}. Resume with the '
                        'same settings, or from a checkpoint at the end of an epoch.'
                    )
            _steps_done(self.plan(epoch), sample_in_epoch)  # fails now, not at the first batch, if it is no step end
        self._resume = (epoch, sample_in_epoch)

    def _plan_settings(self) -> dict[str, Any]:
        return {
            'world_size': self.world_size,
            'device_batch_size': self.device_batch_size,
            'seed': self.seed,
            'shuffle': self.shuffle,
            'buckets': [list(bucket) for bucket in self.buckets],
            'num_samples': self.num_samples,
        }


class BucketedDataset(Dataset):
    """Map-style view of a dataset for a DataLoader driven by :class:`AspectBucketSampler`.

    ``StreamingDataset`` is an ``IterableDataset``, which a DataLoader refuses to combine with a batch sampler; this
    view reads samples by :class:`BucketIndex` and shows Composer the sampler's ``state_dict``/``load_state_dict``
    (Composer looks for them on ``dataloader.dataset``).

    Args:
        dataset (Dataset): Whose ``__getitem__`` accepts a :class:`BucketIndex`.
        sampler (AspectBucketSampler): The batch sampler of the DataLoader.
    """

    def __init__(self, dataset: Dataset, sampler: AspectBucketSampler):
        self.dataset = dataset
        self.sampler = sampler

    def __getitem__(self, request: BucketIndex) -> Any:
        return self.dataset[request]

    def __len__(self) -> int:
        return self.sampler.num_samples

    def state_dict(self, num_samples: int, from_beginning: bool = True) -> dict[str, Any]:
        """See :meth:`AspectBucketSampler.state_dict`; with the dataset's fingerprint when it has one."""
        state = self.sampler.state_dict(num_samples, from_beginning)
        if hasattr(self.dataset, 'fingerprint'):
            state[FINGERPRINT_KEY] = self.dataset.fingerprint()
        return state

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        """See :meth:`AspectBucketSampler.load_state_dict`, after the dataset checked the saved fingerprint.

        When the data changed and the dataset allows it, an interrupted epoch starts again from its beginning:
        the plan of the new data cannot tell which samples were trained already.
        """
        obj = dict(obj)
        saved = obj.pop(FINGERPRINT_KEY, None)
        changed = hasattr(self.dataset, 'check_fingerprint') and self.dataset.check_fingerprint(saved)
        if changed and int(obj.get('sample_in_epoch', 0)) > 0:
            log.warning(
                'The data changed during epoch %s: it starts again from its beginning, planned over the data as '
                'they are now (%d samples were trained in it).',
                obj.get('epoch'),
                int(obj['sample_in_epoch']),
            )
            obj['sample_in_epoch'] = 0
        self.sampler.load_state_dict(obj)

    def __getstate__(self) -> dict[str, Any]:
        # Workers only read samples: leave the sampler (with its per-sample array) in the main process.
        return {**self.__dict__, 'sampler': None}


class BucketedDataLoader(DataLoader):
    """DataLoader whose batches are the steps of an :class:`AspectBucketSampler`.

    A DataLoader built on a batch sampler reports ``batch_size = None``; this one reports the sampler's
    ``device_batch_size``, which Composer takes as the microbatch size when ``device_train_microbatch_size`` is not
    set. (A step that carries a bucket's small remainder has one sample more on some ranks; Composer then trains it
    as two microbatches.)

    Args:
        dataset (Dataset): Whose ``__getitem__`` accepts a :class:`BucketIndex`; wrapped in :class:`BucketedDataset`.
        sampler (AspectBucketSampler): The plan.
        **dataloader_kwargs: Passed to ``DataLoader`` (``num_workers``, ``persistent_workers``, ``pin_memory``,
            ``prefetch_factor``, ...).
    """

    def __init__(self, dataset: Dataset, sampler: AspectBucketSampler, **dataloader_kwargs: Any):
        super().__init__(BucketedDataset(dataset, sampler), batch_sampler=sampler, **dataloader_kwargs)

    @property
    def batch_size(self) -> int:
        return self.batch_sampler.device_batch_size

    @batch_size.setter
    def batch_size(self, value: Optional[int]) -> None:
        pass  # DataLoader.__init__ sets None for a batch sampler; the sampler's size stands


def read_sample_sizes(dataset: StreamingDataset, image_key: str = 'image', progress: bool = True) -> np.ndarray:
    """(N, 2) int32 ``(height, width)`` of every sample, identical on every rank, cached next to the local copy.

    Read from the ``height`` and ``width`` columns the pipeline writes, or from the image header (orientation
    applied) where they are missing or zero; ``(1, 1)`` for an image without a readable header (it is replaced by
    the next usable sample when loaded). Each rank reads every ``world_size``-th shard (downloading those of a
    remote dataset into the local cache) and the ranks all-gather the sizes. The result is saved as
    ``aspect_sizes.<hash of index.json>.npy`` in the first stream's local folder; later runs load it when every
    rank finds it.

    Args:
        dataset (StreamingDataset): The dataset; read with ``get_item``.
        image_key (str): Column of the encoded image, for samples without size columns. Default: ``'image'``.
        progress (bool): Show a progress bar on rank 0. Default: ``True``.
    """
    path = _cache_path(dataset, image_key)
    sizes = _load_cache(path, dataset.num_samples)
    if all(dist.all_gather_object(sizes is not None)):
        return sizes
    rank, world_size = dist.get_global_rank(), dist.get_world_size()
    mine = {}
    shard_ids = range(rank, dataset.num_shards, world_size)
    for shard_id in tqdm(shard_ids, desc='Reading image sizes', unit='shard', disable=not progress or rank != 0):
        begin = int(dataset.sample_offset_per_shard[shard_id])
        count = int(dataset.samples_per_shard[shard_id])
        mine[shard_id] = np.array(
            [_sample_size(dataset, index, image_key) for index in range(begin, begin + count)], np.int32
        ).reshape(-1, 2)
    sizes = np.zeros((dataset.num_samples, 2), np.int32)
    for part in dist.all_gather_object(mine):
        for shard_id, shard_sizes in part.items():
            begin = int(dataset.sample_offset_per_shard[shard_id])
            sizes[begin : begin + len(shard_sizes)] = shard_sizes
    if path is not None and dist.get_local_rank() == 0:
        _save_cache(path, sizes)
    return sizes


def _sample_size(dataset: StreamingDataset, index: int, image_key: str) -> tuple[int, int]:
    try:
        sample = dataset.get_item(index)
    except UnusableSample:  # e.g. text that is not UTF-8: replaced when loaded; any bucket does
        return 1, 1
    height, width = sample.get('height'), sample.get('width')
    if isinstance(height, (int, np.integer)) and isinstance(width, (int, np.integer)) and height > 0 and width > 0:
        return int(height), int(width)
    try:
        with Image.open(io.BytesIO(sample[image_key])) as image:
            width, height = image.size
            # EXIF orientations 5-8 turn the image a quarter, which the decoder applies.
            if image.getexif().get(0x0112) in (5, 6, 7, 8):
                height, width = width, height
        return height, width
    except Exception:  # an unreadable image is replaced when loaded; any bucket does
        return 1, 1


def _cache_path(dataset: StreamingDataset, image_key: str) -> Optional[str]:
    digest = hashlib.sha256(image_key.encode())
    for stream in dataset.streams:
        index = os.path.join(stream.local, stream.split or '', 'index.json')
        if not os.path.isfile(index):
            return None
        with open(index, 'rb') as f:
            digest.update(f.read())
    first = dataset.streams[0]
    return os.path.join(first.local, first.split or '', f'aspect_sizes.{digest.hexdigest()[:16]}.npy')


def _load_cache(path: Optional[str], num_samples: int) -> Optional[np.ndarray]:
    if path is None or not os.path.isfile(path):
        return None
    try:
        sizes = np.load(path)
    except (OSError, ValueError) as error:
        log.warning('Ignoring the unreadable size cache %s: %s', path, error)
        return None
    return sizes if sizes.shape == (num_samples, 2) else None


def _save_cache(path: str, sizes: np.ndarray) -> None:
    # Written under another name and renamed: a rank of another run never loads half a file.
    partial = f'{path}.{os.getpid()}.tmp'
    try:
        with open(partial, 'wb') as f:
            np.save(f, sizes)
        os.replace(partial, path)
    except OSError as error:
        log.warning('Could not cache the image sizes at %s (%s); the next run reads them again.', path, error)


def _steps_done(steps: list[tuple[int, np.ndarray]], num_samples: int) -> int:
    """How many of ``steps`` the first ``num_samples`` samples of the epoch fill exactly."""
    ends = np.cumsum([0] + [len(indices) for _, indices in steps])
    position = int(np.searchsorted(ends, num_samples))
    if position >= len(ends) or ends[position] != num_samples:
        raise ValueError(
            f'{num_samples} samples into the epoch is not the end of a step of this plan (steps end at '
            f'{", ".join(map(str, ends[1:6]))}, ... of {ends[-1]}): the checkpoint comes from another plan.'
        )
    return position


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, multiple * math.floor(value / multiple + 0.5))


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value
