"""Aspect-ratio buckets: bucket geometry, the epoch plan over ranks, resumption, workers, 1 and 2 processes."""

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from streaming import MDSWriter

from diffusion.data.aspect_buckets import (
    AspectBucketSampler,
    BucketIndex,
    assign_buckets,
    buckets_for,
    plan_epoch,
    read_sample_sizes,
    resolve_buckets,
    validate_buckets,
)
from diffusion.data.image_caption import StreamingImageCaptionDataset, build_image_caption_dataloader
from tests.conftest import run_script

BUCKETS = [[32, 32], [32, 48], [48, 32]]  # height, width
# (height, width) of the test images: squares, landscapes, portraits, and ratios between or beyond the buckets'.
SHAPES = [(32, 32), (40, 40), (36, 54), (30, 50), (54, 36), (50, 30), (24, 60), (60, 24), (33, 47), (44, 38)]


def encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format='PNG')
    return buffer.getvalue()


def write_images(out: str, shapes, seed: int = 0, size_columns: bool = True, extra=None, size_limit=20000) -> list:
    """MDS shards of random-noise PNGs of the given (height, width) shapes; returns the pixel arrays."""
    rng = np.random.default_rng(seed)
    columns = {'image': 'bytes', 'caption': 'str'}
    if size_columns:
        columns.update(width='int', height='int')
    columns.update({key: 'int' for key in (extra or [{}])[0]})
    arrays = []
    with MDSWriter(out=out, columns=columns, size_limit=size_limit, hashes=['xxh64']) as writer:
        for i, (height, width) in enumerate(shapes):
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            arrays.append(pixels)
            sample = {'image': encode_png(pixels), 'caption': f'image {i}'}
            if size_columns:
                sample.update(width=width, height=height)
            sample.update((extra or [{}] * len(shapes))[i])
            writer.write(sample)
    return arrays


def varied_shapes(n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [SHAPES[i] for i in rng.integers(0, len(SHAPES), n)]


@pytest.fixture(scope='module')
def varied_dataset(tmp_path_factory) -> str:
    """120 images of varied shapes in about 30 shards."""
    out = str(tmp_path_factory.mktemp('buckets') / 'train')
    write_images(out, varied_shapes(120))
    return out


@pytest.mark.parametrize(
    'buckets, message',
    [
        ([[32, 32], [30, 48]], r'aspect_buckets\[1\] = \[30, 48\]: .*multiples of 8'),
        ([[32, -8]], r'aspect_buckets\[0\] = \[32, -8\]: .*positive'),
        ([[32, 32, 32]], r'aspect_buckets\[0\] = \[32, 32, 32\]: a bucket is a \[height, width\] pair'),
        ([[32, 48], [32, 48]], r'aspect_buckets\[1\] = \[32, 48\]: the same bucket as aspect_buckets\[0\]'),
        ([[32.0, 48]], r'aspect_buckets\[0\] = \[32.0, 48\]: height and width must be integers'),
        ([], 'non-empty list'),
    ],
)
def test_bad_buckets_are_named(buckets, message):
    with pytest.raises(ValueError, match=message):
        validate_buckets(buckets)


def test_buckets_for_gives_about_equal_pixel_counts_within_the_ratio():
    buckets = buckets_for(1024, step=64, max_ratio=2.0)
    assert {(1024, 1024), (1152, 896), (896, 1152), (1344, 768), (768, 1344)} <= set(buckets)
    assert len(buckets) == 9
    for height, width in buckets:
        assert height % 64 == 0 and width % 64 == 0
        assert max(height, width) / min(height, width) <= 2.0
        assert abs(height * width / 1024**2 - 1) < 0.1
        assert (width, height) in buckets
    ratios = [h / w for h, w in buckets]
    assert ratios == sorted(ratios)  # widest first
    assert resolve_buckets({'resolution': 1024}) == buckets
    with pytest.raises(ValueError, match="got \\['base'\\]"):
        resolve_buckets({'base': 1024})
    with pytest.raises(ValueError, match='multiple of step=64, got 1000'):
        buckets_for(1000)


def test_each_image_goes_to_the_bucket_of_nearest_log_ratio():
    buckets = validate_buckets([[64, 64], [48, 80], [80, 48]])
    # A 300x200 (width x height) image has height/width 0.667: nearest to 48/80 = 0.6 in log ratio, not 1.
    sizes = np.array([(200, 300), (300, 200), (100, 100), (120, 100), (100, 1000)])
    assert assign_buckets(sizes, buckets).tolist() == [1, 2, 0, 0, 1]


def test_a_bucket_with_fewer_samples_than_ranks_moves_to_the_next_nearest():
    buckets = validate_buckets([[32, 32], [32, 48], [48, 32], [24, 64]])
    # One 24x64-like image: alone in its bucket, it cannot give both ranks a sample, so it joins 32x48 (the next
    # nearest ratio), which holds enough.
    sizes = np.array([(32, 32)] * 3 + [(32, 48)] * 2 + [(48, 32)] * 2 + [(24, 66)])
    assert assign_buckets(sizes, buckets, min_count=1).tolist() == [0, 0, 0, 1, 1, 2, 2, 3]
    assert assign_buckets(sizes, buckets, min_count=2).tolist() == [0, 0, 0, 1, 1, 2, 2, 1]
    with pytest.raises(ValueError, match='8 samples cannot give each of 9 ranks a sample'):
        assign_buckets(sizes, buckets, min_count=9)


def rank_batches(sizes, world_size, device_batch_size, seed=1, epochs=1):
    """Each rank's batches of each epoch, from one sampler per rank as on separate processes."""
    samplers = [
        AspectBucketSampler(sizes, BUCKETS, device_batch_size, seed=seed, rank=rank, world_size=world_size)
        for rank in range(world_size)
    ]
    return [[list(sampler) for _ in range(epochs)] for sampler in samplers], samplers


@pytest.mark.parametrize('world_size, device_batch_size', [(1, 4), (2, 4), (3, 4), (2, 1), (4, 5)])
def test_every_sample_once_per_epoch_in_steps_of_one_shape(world_size, device_batch_size):
    sizes = np.array(varied_shapes(151, seed=world_size))
    batches, samplers = rank_batches(sizes, world_size, device_batch_size, epochs=2)
    assigned = assign_buckets(sizes, validate_buckets(BUCKETS), min_count=world_size)
    for epoch in range(2):
        steps = [batches[rank][epoch] for rank in range(world_size)]
        assert len({len(s) for s in steps}) == 1 and len(steps[0]) == len(samplers[0])
        seen = []
        for step in zip(*steps):
            shapes = {(r.height, r.width) for batch in step for r in batch}
            assert len(shapes) == 1  # one bucket over all ranks
            lengths = [len(batch) for batch in step]
            assert min(lengths) >= 1 and max(lengths) - min(lengths) <= 1
            assert max(lengths) <= device_batch_size + 1
            for batch in step:
                for request in batch:
                    assert tuple(BUCKETS[assigned[request.index]]) == (request.height, request.width)
                    assert request.epoch == epoch
                    seen.append(request.index)
        assert sorted(seen) == list(range(len(sizes)))
    # Steps are full (device_batch_size on each rank) except one at most per bucket.
    step_sizes = [sum(len(batches[r][0][s]) for r in range(world_size)) for s in range(len(samplers[0]))]
    assert sum(size != device_batch_size * world_size for size in step_sizes) <= len(BUCKETS)


def test_plan_is_deterministic_for_a_seed_and_changes_with_epoch_and_seed():
    sizes = np.array(varied_shapes(100))
    assigned = assign_buckets(sizes, validate_buckets(BUCKETS), min_count=2)

    def plan(seed, epoch):
        return [(bucket, indices.tolist()) for bucket, indices in plan_epoch(assigned, 3, 4, 2, seed, epoch)]

    assert plan(5, 0) == plan(5, 0)
    assert plan(5, 0) != plan(5, 1)
    assert plan(5, 0) != plan(6, 0)
    ordered = plan_epoch(assigned, 3, 4, 2, 5, 0, shuffle=False)
    assert [bucket for bucket, _ in ordered] == sorted(bucket for bucket, _ in ordered)
    assert np.concatenate([indices for _, indices in ordered]).tolist() == np.argsort(assigned, kind='stable').tolist()


def global_samples(batches_of_ranks, steps):
    return sum(len(batches[step]) for batches in batches_of_ranks for step in range(steps))


@pytest.mark.parametrize('stop', [0, 1, 7, 'last'])
def test_sampler_resumes_with_the_remaining_steps(stop):
    sizes = np.array(varied_shapes(90))
    batches, _ = rank_batches(sizes, 2, 4, epochs=2)
    num_steps = len(batches[0][0])
    stop = num_steps if stop == 'last' else stop
    for rank in range(2):
        interrupted = AspectBucketSampler(sizes, BUCKETS, 4, seed=1, rank=rank, world_size=2)
        iterator = iter(interrupted)
        for _ in range(stop):
            next(iterator)
        # Composer gives the samples of all ranks in the epoch so far.
        state = json.loads(json.dumps(interrupted.state_dict(global_samples([b[0] for b in batches], stop), True)))
        resumed = AspectBucketSampler(sizes, BUCKETS, 4, seed=1, rank=rank, world_size=2)
        resumed.load_state_dict(state)
        assert resumed.state_dict(0, False)['sample_in_epoch'] == state['sample_in_epoch']
        assert list(resumed) == batches[rank][0][stop:]
        assert list(resumed) == batches[rank][1]  # and the next epoch is the uninterrupted run's next epoch


def test_state_at_the_end_of_an_epoch_starts_the_next_one():
    sizes = np.array(varied_shapes(40))
    sampler = AspectBucketSampler(sizes, BUCKETS, 4, seed=3, rank=0, world_size=1)
    assert sampler.state_dict(0, True)['epoch'] == 0  # before any iteration
    epoch0 = list(sampler)
    # Composer checkpoints at the end of an epoch with sample_in_epoch = 0: the resumed run starts epoch 1.
    state = sampler.state_dict(0, True)
    assert (state['epoch'], state['sample_in_epoch']) == (1, 0)
    resumed = AspectBucketSampler(sizes, BUCKETS, 4, seed=3, rank=0, world_size=1)
    resumed.load_state_dict(state)
    epoch1 = list(resumed)
    assert epoch1 == list(AspectBucketSampler(sizes, BUCKETS, 4, seed=3, rank=0, world_size=1).plan_batches(1))
    assert epoch1 != epoch0


def test_resuming_mid_epoch_with_another_plan_is_refused():
    sizes = np.array(varied_shapes(40))
    sampler = AspectBucketSampler(sizes, BUCKETS, 4, seed=3, rank=0, world_size=2)
    next(iter(sampler))
    trained = len(sampler.plan(0)[0][1])  # the samples of both ranks in the first step
    state = sampler.state_dict(trained, True)
    other = AspectBucketSampler(sizes, BUCKETS, 2, seed=3, rank=0, world_size=4)
    with pytest.raises(ValueError, match='taken with world_size=2 and this run has world_size=4'):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match=f'{trained + 1} samples into the epoch is not the end of a step'):
        AspectBucketSampler(sizes, BUCKETS, 4, seed=3, rank=0, world_size=2).load_state_dict(
            {**state, 'sample_in_epoch': trained + 1}
        )
    # At an epoch boundary nothing was trained yet, so another plan may start there.
    other.load_state_dict({**state, 'sample_in_epoch': 0})
    assert next(iter(other))[0].epoch == 0


def test_bucketed_sample_is_cropped_to_its_bucket(tmp_path):
    out = str(tmp_path / 'one')
    write_images(out, [(200, 300)])  # 300 wide, 200 high
    buckets = validate_buckets([[64, 64], [48, 80], [80, 48]])
    (bucket,) = assign_buckets(read_sample_sizes(StreamingImageCaptionDataset(local=out)), buckets)
    assert buckets[bucket] == (48, 80)
    dataset = StreamingImageCaptionDataset(local=out, crop='random', micro_conditioning=True)
    # Covering 48x80 keeps the aspect: 80 / 300 = 0.2667 -> 53x80, so the crop may start anywhere in rows 0-5.
    tops = set()
    for epoch in range(20):
        sample = dataset[BucketIndex(0, 48, 80, epoch)]
        assert sample['image'].shape == (3, 48, 80)
        assert sample['cond_target_size'].tolist() == [48, 80]
        top, left = sample['cond_crops_coords_top_left'].tolist()
        assert 0 <= top <= 53 - 48 and left == 0
        tops.add(top)
    assert len(tops) > 2


def test_sizes_come_from_columns_or_headers_and_are_cached(tmp_path):
    with_columns = str(tmp_path / 'columns')
    write_images(with_columns, [(20, 30), (40, 16)])
    dataset = StreamingImageCaptionDataset(local=with_columns)
    assert read_sample_sizes(dataset).tolist() == [[20, 30], [40, 16]]
    (cache,) = [name for name in os.listdir(with_columns) if name.startswith('aspect_sizes.')]
    # A later run loads the cache instead of reading the shards again.
    np.save(os.path.join(with_columns, cache), np.array([[7, 9], [9, 7]], np.int32))
    assert read_sample_sizes(StreamingImageCaptionDataset(local=with_columns)).tolist() == [[7, 9], [9, 7]]

    headers = str(tmp_path / 'headers')
    write_images(headers, [(20, 30), (40, 16)], size_columns=False)
    assert read_sample_sizes(StreamingImageCaptionDataset(local=headers)).tolist() == [[20, 30], [40, 16]]


def test_exif_rotation_swaps_the_header_size(tmp_path):
    out = str(tmp_path / 'exif')
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 30 wide and 20 high, shown turned a quarter: 20 wide, 30 high
    Image.new('RGB', (30, 20)).save(buffer, format='JPEG', exif=exif)
    with MDSWriter(out=out, columns={'image': 'bytes', 'caption': 'str'}, hashes=['xxh64']) as writer:
        writer.write({'image': buffer.getvalue(), 'caption': 'turned'})
    dataset = StreamingImageCaptionDataset(local=out, micro_conditioning=True)
    assert read_sample_sizes(dataset).tolist() == [[30, 20]]
    assert dataset[BucketIndex(0, 48, 32, 0)]['cond_original_size'].tolist() == [30, 20]


def loader_batches(data, num_workers, **kwargs):
    loader = build_image_caption_dataloader(
        data,
        batch_size=8,
        aspect_buckets=BUCKETS,
        micro_conditioning=True,
        crop='random',
        random_flip=True,
        num_workers=num_workers,
        **kwargs,
    )
    return loader, [batch for batch in loader]


def test_dataloader_workers_give_identical_batches(varied_dataset):
    _, serial = loader_batches(varied_dataset, 0)
    _, parallel = loader_batches(varied_dataset, 2)
    assert len(serial) == len(parallel) == 16  # 120 samples in 3 buckets, batches of 8
    for a, b in zip(serial, parallel):
        assert a.keys() == b.keys()
        for key in ('image', 'sample_index', 'cond_original_size', 'cond_crops_coords_top_left', 'cond_target_size'):
            assert torch.equal(a[key], b[key]), key
    assert sorted(torch.cat([b['sample_index'] for b in serial]).tolist()) == list(range(120))


def test_dataloader_state_resumes_mid_epoch(varied_dataset):
    loader, full = loader_batches(varied_dataset, 0)
    second_epoch = list(loader)
    interrupted = build_image_caption_dataloader(
        varied_dataset, batch_size=8, aspect_buckets=BUCKETS, micro_conditioning=True, crop='random', random_flip=True
    )
    trained = 0
    for step, batch in enumerate(interrupted):
        trained += len(batch['sample_index'])
        if step == 4:
            break
    # What Composer 0.32.1 does: state_dict(sample_in_epoch, True) on dataloader.dataset, load_state_dict on resume.
    state = interrupted.dataset.state_dict(trained, True)
    resumed = build_image_caption_dataloader(
        varied_dataset, batch_size=8, aspect_buckets=BUCKETS, micro_conditioning=True, crop='random', random_flip=True
    )
    resumed.dataset.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(full) - 5
    for a, b in zip(rest, full[5:]):
        assert torch.equal(a['sample_index'], b['sample_index']) and torch.equal(a['image'], b['image'])
    assert [b['sample_index'].tolist() for b in resumed] == [b['sample_index'].tolist() for b in second_epoch]


@pytest.mark.slow
def test_one_and_two_processes(varied_dataset, tmp_path):
    common = ('--data', varied_dataset, '--buckets', json.dumps(BUCKETS), '--batch-size', '8', '--seed', '11')
    run_script(
        'tests/data/aspect_bucket_worker.py',
        *common,
        '--out',
        str(tmp_path / 'two'),
        '--resume-after',
        '3',
        processes=2,
    )
    ranks = []
    for rank in range(2):
        with open(tmp_path / 'two' / f'rank{rank}.json') as f:
            ranks.append(json.load(f))
    sizes = read_sample_sizes(StreamingImageCaptionDataset(local=varied_dataset))
    for epoch in range(2):
        steps0, steps1 = ranks[0]['epochs'][epoch], ranks[1]['epochs'][epoch]
        assert len(steps0) == len(steps1) == ranks[0]['num_steps']
        ids = []
        for a, b in zip(steps0, steps1):
            assert a['shape'] == b['shape'] and a['shape'] in BUCKETS
            assert all(target == a['shape'] for target in a['target'] + b['target'])
            ids += a['ids'] + b['ids']
        assert sorted(ids) == list(range(120))  # every sample exactly once over ranks and steps
        # The same plan as computed here for the same seed: the processes agree with each other and with this one.
        for rank in range(2):
            sampler = AspectBucketSampler(sizes, BUCKETS, 4, seed=11, rank=rank, world_size=2)
            expected = [[r.index for r in batch] for batch in sampler.plan_batches(epoch)]
            assert [step['ids'] for step in ranks[rank]['epochs'][epoch]] == expected
    assert ranks[0]['epochs'][0] != ranks[0]['epochs'][1]
    for rank in range(2):  # resumed after 3 steps: the remaining steps, then the same next epoch
        assert ranks[rank]['resumed'] == ranks[rank]['epochs'][0][3:]
        assert ranks[rank]['after_resume'] == ranks[rank]['epochs'][1]

    # One process (this one) covers the same set with its own plan of the same seed.
    one = [batch['sample_index'].tolist() for batch in loader_batches(varied_dataset, 0, shuffle_seed=11)[1]]
    one_ids = [i for step in one for i in step]
    assert sorted(one_ids) == list(range(120))
    assert {i for step in ranks[0]['epochs'][0] + ranks[1]['epochs'][0] for i in step['ids']} == set(one_ids)
    assert len(one) == 16 and ranks[0]['num_steps'] == 16  # 2 ranks x 4 or 1 rank x 8: the same global steps


def read_ledger(run_folder):
    with open(os.path.join(run_folder, 'ledger', 'rank0.jsonl')) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_composer_resumes_a_bucketed_epoch_where_it_stopped(varied_dataset, tmp_path):
    import glob

    from diffusion.builders import build_trainer
    from tests.conftest import tiny_config

    common = (
        '+train_dataloader.aspect_buckets=[[16,16],[16,24],[24,16]]',
        '+train_dataloader.micro_conditioning=true',
        'train_dataloader.crop=random',
        'train_dataloader.batch_size=8',
        'save_interval=4ba',
    )
    full = build_trainer(tiny_config(varied_dataset, str(tmp_path / 'full'), 'max_duration=18ba', *common))
    steps_per_epoch = len(full.state.dataloader)
    assert steps_per_epoch == 16  # 120 samples in 3 buckets, batches of 8: 18 batches cross into epoch 1
    full.fit()
    full_ledger = read_ledger(tmp_path / 'full')
    assert sorted(i for r in full_ledger[:steps_per_epoch] for i in r['samples']) == list(range(120))
    # Mid-epoch (batch 4) and at the end of the epoch (batch 16): the resumed run trains what the full run trained.
    for name, batch in (('mid', 4), ('end', 16)):
        (checkpoint,) = glob.glob(f'{tmp_path}/full/checkpoints/ep*-ba{batch}-rank0.pt')
        resumed = build_trainer(
            tiny_config(
                varied_dataset,
                str(tmp_path / name),
                'max_duration=18ba',
                f'load_path={checkpoint}',
                'load_trusted=true',
                *common,
            )
        )
        assert resumed.state.dataset_resumption == {'train': True}  # Composer used the sampler's state
        resumed.fit()
        resumed_ledger = read_ledger(tmp_path / name)
        assert [r['batch'] for r in resumed_ledger] == list(range(batch, 18))
        assert [r['samples'] for r in resumed_ledger] == [r['samples'] for r in full_ledger[batch:]]
