import pytest
import torch

from diffusion.data.image_caption import (
    StreamingImageCaptionDataset,
    build_image_caption_dataloader,
    decode_image,
    resolve_source,
)
from diffusion.data.synthetic import render_sample, write_synthetic_dataset
from diffusion.evaluation.prompt_following import dominant_color
from diffusion.models.text_encoders import build_clip_tokenizer


def test_samples_are_normalised_tokenized_and_match_their_captions(synthetic_dataset):
    tokenizer = build_clip_tokenizer()
    dataset = StreamingImageCaptionDataset(local=synthetic_dataset, tokenizer=tokenizer, resolution=16, crop='center')
    assert len(dataset) == 128
    for index in (0, 5, 77):
        sample = dataset[index]
        assert sample['image'].shape == (3, 16, 16) and sample['image'].dtype == torch.float32
        assert -1.0 <= float(sample['image'].min()) and float(sample['image'].max()) <= 1.0
        _, record = render_sample(index, seed=0, image_size=32)
        assert sample['captions'] == record['caption']
        expected_ids = tokenizer(record['caption'], padding='max_length', max_length=77).input_ids
        assert sample['input_ids'].tolist() == expected_ids
        assert sample['sample_index'] == index
        # The pixels still show the captioned colour after decode, resize and normalisation.
        assert dominant_color((sample['image'] + 1) / 2) == record['color']


def write_gradient_dataset(out: str) -> str:
    """One 64x32 image whose columns all differ, so every crop position and a flip give other pixels."""
    import io

    import numpy as np
    from PIL import Image
    from streaming import MDSWriter

    pixels = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (32, 1, 3))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format='PNG')
    with MDSWriter(out=out, columns={'image': 'bytes', 'caption': 'str'}) as writer:
        writer.write({'image': buffer.getvalue(), 'caption': 'a gradient'})
    return out


def test_random_flip_mirrors_about_half_the_samples(tmp_path):
    out = write_gradient_dataset(str(tmp_path / 'wide'))
    plain = StreamingImageCaptionDataset(local=out, resolution=32, crop='center')[0]['image']
    flipping = StreamingImageCaptionDataset(local=out, resolution=32, crop='center', random_flip=True)
    draws = [flipping[0]['image'] for _ in range(40)]
    flipped = sum(torch.equal(d, plain.flip(-1)) for d in draws)
    assert sum(torch.equal(d, plain) for d in draws) + flipped == 40
    assert 8 <= flipped <= 32


def test_center_crop_is_deterministic_and_random_crop_varies(tmp_path):
    out = write_gradient_dataset(str(tmp_path / 'wide'))
    center = StreamingImageCaptionDataset(local=out, resolution=16, crop='center')
    assert center[0]['image'].shape == (3, 16, 16)
    assert torch.equal(center[0]['image'], center[0]['image'])
    rand = StreamingImageCaptionDataset(local=out, resolution=16, crop='random')
    crops = {rand[0]['image'].sum().item() for _ in range(10)}
    assert len(crops) > 1


def test_hue_jitter_rotates_colours_and_keeps_everything_else(synthetic_dataset):
    """The autoencoder's augmentation: hues turn by up to the given fraction of the circle; the brightness of
    each pixel (its max over RGB), the caption and the crop stay; 0 turns it off; out of range is refused."""
    plain = StreamingImageCaptionDataset(local=synthetic_dataset, resolution=16, crop='center')
    jittered = StreamingImageCaptionDataset(local=synthetic_dataset, resolution=16, crop='center', hue_jitter=0.5)
    torch.manual_seed(0)
    colours = set()
    for index in range(12):
        a, b = plain[index], jittered[index]
        assert b['captions'] == a['captions'] and b['image'].shape == a['image'].shape
        assert -1.0 <= float(b['image'].min()) and float(b['image'].max()) <= 1.0
        # A hue rotation keeps each pixel's HSV value (the max of its channels), up to rounding.
        assert torch.allclose(b['image'].amax(0), a['image'].amax(0), atol=0.02)
        colours.add(dominant_color((b['image'] + 1) / 2) == dominant_color((a['image'] + 1) / 2))
    assert colours == {True, False}  # some objects changed colour, and (by chance of the draw) some not
    still = StreamingImageCaptionDataset(local=synthetic_dataset, resolution=16, crop='center', hue_jitter=0.0)
    assert torch.equal(still[3]['image'], plain[3]['image'])
    with pytest.raises(ValueError, match=r'hue_jitter must be in \[0, 0.5\].*0.7'):
        StreamingImageCaptionDataset(local=synthetic_dataset, resolution=16, hue_jitter=0.7)


def test_dataloader_batches(synthetic_dataset):
    loader = build_image_caption_dataloader(
        synthetic_dataset, batch_size=8, tokenizer=build_clip_tokenizer(), resolution=16, shuffle=False
    )
    batch = next(iter(loader))
    assert batch['image'].shape == (8, 3, 16, 16)
    assert batch['input_ids'].shape == (8, 77)
    assert len(batch['captions']) == 8
    assert batch['sample_index'].tolist() == list(range(8))


def test_missing_dataset_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match='nowhere'):
        resolve_source(str(tmp_path / 'nowhere'), None)


def test_bad_crop_and_undivisible_batch_raise(synthetic_dataset, monkeypatch):
    with pytest.raises(ValueError, match="'middle'"):
        StreamingImageCaptionDataset(local=synthetic_dataset, crop='middle')
    monkeypatch.setattr('composer.utils.dist.get_world_size', lambda: 3)
    with pytest.raises(ValueError, match='batch_size 8 is not divisible by the number of ranks \\(3\\)'):
        build_image_caption_dataloader(synthetic_dataset, batch_size=8)


def test_undecodable_image_error_names_the_sample(tmp_path):
    from streaming import MDSWriter

    out = str(tmp_path / 'bad')
    with MDSWriter(out=out, columns={'image': 'bytes', 'caption': 'str', 'source_url': 'str'}) as writer:
        writer.write({'image': b'not an image', 'caption': 'x', 'source_url': 'https://bad.invalid/1'})
    dataset = StreamingImageCaptionDataset(local=out, resolution=16)
    with pytest.raises(ValueError, match='sample 0 \\(https://bad.invalid/1\\)'):
        dataset[0]


def test_decode_refuses_huge_declared_size():
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new('RGB', (64, 64)).save(buffer, format='PNG')
    with pytest.raises(ValueError, match='decompression_bomb: 64x64 exceeds 1000 pixels'):
        decode_image(buffer.getvalue(), max_pixels=1000)


@pytest.mark.remote
def test_streams_from_s3(s3_server, tmp_path):
    write_synthetic_dataset('s3://test-bucket/demo/train', num_samples=16, seed=3, image_size=32, progress=False)
    loader = build_image_caption_dataloader(
        's3://test-bucket/demo/train', local=str(tmp_path / 'cache'), batch_size=4, resolution=16, shuffle=False
    )
    batches = list(loader)
    assert len(batches) == 4
    captions = [c for b in batches for c in b['captions']]
    assert captions == [render_sample(i, seed=3, image_size=32)[1]['caption'] for i in range(16)]
    assert (tmp_path / 'cache' / 'index.json').exists()


def write_two_caption_dataset(out: str, count: int = 40) -> str:
    import io

    from PIL import Image
    from streaming import MDSWriter

    buffer = io.BytesIO()
    Image.new('RGB', (16, 16)).save(buffer, format='PNG')  # the smallest side min_image_side accepts by default
    columns = {'image': 'bytes', 'caption': 'str', 'original_caption': 'str'}
    with MDSWriter(out=out, columns=columns) as writer:
        for index in range(count):
            # Every tenth sample has no alt text, as happens in scraped data.
            original = '' if index % 10 == 9 else f'original {index}'
            writer.write({'image': buffer.getvalue(), 'caption': f'synthetic {index}', 'original_caption': original})
    return out


def test_caption_source_picks_synthetic_original_or_a_reproducible_mix(tmp_path):
    out = write_two_caption_dataset(str(tmp_path / 'data'))

    def captions(**kwargs) -> list[str]:
        dataset = StreamingImageCaptionDataset(local=out, resolution=8, crop='center', **kwargs)
        return [dataset[i]['captions'] for i in range(len(dataset))]

    assert captions() == [f'synthetic {i}' for i in range(40)]
    original = captions(caption_source='original')
    assert original[0] == 'original 0' and original[9] == 'synthetic 9'  # no alt text: the synthetic one trains
    mixed = captions(caption_source='mix', original_caption_prob=0.5)
    share = sum(c.startswith('original') for c in mixed) / 36  # of the samples that have alt text
    assert 0.25 <= share <= 0.75
    assert mixed == captions(caption_source='mix', original_caption_prob=0.5)  # the same draw every time
    assert mixed != captions(caption_source='mix', original_caption_prob=0.5, caption_seed=1)
    assert captions(caption_source='mix', original_caption_prob=0.0) == captions()
    assert captions(caption_source='mix', original_caption_prob=1.0) == original
    with pytest.raises(ValueError, match="Unknown caption_source 'alt'. Valid values: synthetic, original, mix"):
        captions(caption_source='alt')
