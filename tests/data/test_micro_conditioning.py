"""SDXL micro-conditioning: the original size, crop corner and target size in the batch equal what was done."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from diffusion.data.aspect_buckets import BucketIndex
from diffusion.data.image_caption import (
    StreamingImageCaptionDataset,
    build_image_caption_dataloader,
    image_transform,
    resize_and_crop,
)
from tests.data.test_aspect_buckets import write_images

COND_KEYS = ('cond_original_size', 'cond_crops_coords_top_left', 'cond_target_size')


def as_model_input(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W) in [-1, 1], as the dataset scales a decoded image."""
    return torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float() / 255 * 2 - 1


@pytest.fixture
def wide_image(tmp_path):
    """One 32x64 (height x width) noise image: a 32x48 bucket needs no resize, so crops are exact slices."""
    out = str(tmp_path / 'wide')
    (pixels,) = write_images(out, [(32, 64)])
    return out, as_model_input(pixels)


def test_reported_corner_is_the_crop_taken(wide_image):
    out, image = wide_image
    dataset = StreamingImageCaptionDataset(local=out, crop='random', micro_conditioning=True)
    lefts = set()
    for epoch in range(24):
        sample = dataset[BucketIndex(0, 32, 48, epoch)]
        top, left = sample['cond_crops_coords_top_left'].tolist()
        assert top == 0 and 0 <= left <= 16
        assert torch.allclose(sample['image'], image[:, :, left : left + 48], atol=1e-6)
        assert sample['cond_target_size'].tolist() == [32, 48]
        assert sample['cond_original_size'].tolist() == [32, 64]  # no original_* columns: the decoded size
        lefts.add(left)
    assert len(lefts) > 4  # the crop really moves between epochs
    center = StreamingImageCaptionDataset(local=out, crop='center', micro_conditioning=True)[BucketIndex(0, 32, 48, 0)]
    assert center['cond_crops_coords_top_left'].tolist() == [0, 8]
    assert torch.allclose(center['image'], image[:, :, 8:56], atol=1e-6)


def test_a_flip_mirrors_the_left_offset(wide_image):
    out, image = wide_image
    dataset = StreamingImageCaptionDataset(local=out, crop='random', random_flip=True, micro_conditioning=True)
    flipped = 0
    for epoch in range(30):
        sample = dataset[BucketIndex(0, 32, 48, epoch)]
        top, left = sample['cond_crops_coords_top_left'].tolist()
        plain = image[:, :, left : left + 48]
        # The corner is that of the flipped image: left' = 64 - left - 48 of the unflipped crop.
        mirrored = image.flip(-1)[:, :, left : left + 48]
        if torch.allclose(sample['image'], mirrored, atol=1e-6):
            flipped += 1
        else:
            assert torch.allclose(sample['image'], plain, atol=1e-6), epoch
    assert 5 <= flipped <= 25
    # Center crop of this image is symmetric, so a flip leaves the corner where it was.
    center = StreamingImageCaptionDataset(local=out, crop='center', random_flip=True, micro_conditioning=True)
    assert {tuple(center[BucketIndex(0, 32, 48, e)]['cond_crops_coords_top_left'].tolist()) for e in range(8)} == {
        (0, 8)
    }


def test_resize_covers_the_target_and_the_crop_is_a_slice_of_the_resized_image():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))  # 300 wide, 200 high
    resized = as_model_input(np.asarray(image.resize((80, 53), Image.BICUBIC)))  # 80 / 300 = 0.2667 of each side
    generator = torch.Generator().manual_seed(0)
    tops = set()
    for _ in range(20):
        pixels, (top, left) = resize_and_crop(image, 48, 80, 'random', generator=generator)
        assert pixels.shape == (3, 48, 80) and left == 0 and 0 <= top <= 5
        assert torch.allclose(pixels, resized[:, top : top + 48, :], atol=1e-6)
        tops.add(top)
    assert len(tops) > 2
    # A tall target on the same image: 48 / 200 -> 48x72, cropped to 48x32 from the centre.
    pixels, corner = resize_and_crop(image, 48, 32, 'center')
    assert pixels.shape == (3, 48, 32) and corner == (0, 20)
    with pytest.raises(ValueError, match="Unknown crop 'side'"):
        resize_and_crop(image, 48, 32, 'side')


def test_original_size_comes_from_the_original_columns_when_positive(tmp_path):
    out = str(tmp_path / 'originals')
    extra = [{'original_height': 3000, 'original_width': 4500}, {'original_height': 0, 'original_width': 0}]
    write_images(out, [(40, 60), (40, 60)], extra=extra)
    dataset = StreamingImageCaptionDataset(local=out, micro_conditioning=True)
    assert dataset[BucketIndex(0, 32, 48, 0)]['cond_original_size'].tolist() == [3000, 4500]
    assert dataset[BucketIndex(1, 32, 48, 0)]['cond_original_size'].tolist() == [40, 60]


def test_square_resolution_micro_conditioning(wide_image):
    out, image = wide_image
    dataset = StreamingImageCaptionDataset(local=out, resolution=32, crop='random', micro_conditioning=True)
    for _ in range(10):
        sample = dataset[0]
        top, left = sample['cond_crops_coords_top_left'].tolist()
        assert sample['cond_target_size'].tolist() == [32, 32] and top == 0 and 0 <= left <= 32
        assert torch.allclose(sample['image'], image[:, :, left : left + 32], atol=1e-6)


def test_without_micro_conditioning_sd2_samples_are_unchanged(wide_image):
    out, _ = wide_image
    dataset = StreamingImageCaptionDataset(local=out, resolution=16, crop='random', random_flip=True)
    torch.manual_seed(3)
    sample = dataset[0]
    assert sorted(sample) == ['captions', 'image', 'replaced', 'sample_index']
    # The same torchvision transform, drawing the same random numbers, as before micro-conditioning existed.
    torch.manual_seed(3)
    expected = image_transform(16, 'random', True)(Image.open(io.BytesIO(dataset.get_item(0)['image'])).convert('RGB'))
    assert torch.equal(sample['image'], expected.clamp(-1, 1))


def test_a_transform_set_by_hand_is_clamped_while_the_default_is_left_as_it_is(wide_image):
    out, image = wide_image
    dataset = StreamingImageCaptionDataset(local=out, resolution=32, crop='center')
    default = dataset[0]['image']
    # The default transform's values need no clamp: they are the image's own, ends included.
    assert torch.allclose(default, image[:, :, 16:48], atol=1e-6) and default.min() == -1.0 and default.max() == 1.0
    dataset.transform = transforms.Compose([image_transform(32, 'center'), lambda pixels: pixels * 3])
    tripled = dataset[0]['image']
    assert torch.equal(tripled, (default * 3).clamp(-1, 1))
    assert (default.abs() > 1 / 3).any() and tripled.abs().max() == 1.0


def test_batches_stack_the_conditioning_as_long_pairs(tmp_path):
    out = str(tmp_path / 'batch')
    write_images(out, [(40, 60)] * 4 + [(60, 40)] * 4)
    loader = build_image_caption_dataloader(
        out, batch_size=4, aspect_buckets=[[32, 48], [48, 32]], micro_conditioning=True, shuffle=False
    )
    batches = list(loader)
    assert [batch['image'].shape for batch in batches] == [(4, 3, 32, 48), (4, 3, 48, 32)]
    for batch, target, original in zip(batches, ([32, 48], [48, 32]), ([40, 60], [60, 40])):
        for key in COND_KEYS:
            assert batch[key].shape == (4, 2) and batch[key].dtype == torch.long
        assert batch['cond_target_size'].tolist() == [target] * 4
        assert batch['cond_original_size'].tolist() == [original] * 4
    plain = next(iter(build_image_caption_dataloader(out, batch_size=4, resolution=16, shuffle=False)))
    assert not set(COND_KEYS) & set(plain)
