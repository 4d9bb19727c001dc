"""FID, KID and CLIP score against independent computations, and the standalone command over folders."""

import hashlib
import json
import os
import re
import shutil

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from diffusion.evaluation import image_metrics
from diffusion.evaluation.image_metrics import GenerationMetrics, build_feature_extractor, to_uint8
from diffusion.evaluation.metrics import main
from diffusion.models.text_encoders import build_clip_tokenizer

PROMPTS = ['a red circle', 'two blue squares on a green background', 'a yellow triangle', 'three purple circles']


class TinyExtractor(nn.Module):
    """uint8 images -> 2x2 average-pooled pixels -> a fixed random affine map: features linear in the pixels."""

    def __init__(self, num_features: int = 8, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer('weight', torch.randn(12, num_features, generator=generator))
        self.register_buffer('bias', torch.randn(num_features, generator=generator))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(images.float() / 255, 2).flatten(1)
        return pooled @ self.weight + self.bias


def save_extractor(path) -> str:
    torch.jit.save(torch.jit.script(TinyExtractor()), str(path))
    return str(path)


def save_tiny_clip(folder) -> str:
    """A 1-layer random CLIPModel + CLIPProcessor (32px images, the offline CLIP tokenizer) saved to ``folder``.

    The sign of the visual projection is chosen so that random images score positive against prompts: the CLIP
    score's clamp at 0 would otherwise hide the values the tests compare.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = build_clip_tokenizer(pad_token='<|endoftext|>')
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=1,
            max_position_embeddings=77,
        ),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=1,
        ),
        projection_dim=8,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(size={'shortest_edge': 32}, crop_size={'height': 32, 'width': 32})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    probe = torch.randint(0, 256, (4, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    if manual_clip_scores(model, processor, probe, PROMPTS).mean() < 0:
        with torch.no_grad():
            model.visual_projection.weight.neg_()
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return str(folder)


@torch.no_grad()
def manual_clip_scores(model, processor, images: torch.Tensor, prompts) -> np.ndarray:
    """100 * cos(image, prompt) per pair, preprocessing by hand (32px images: no resize or crop needed)."""
    config = processor.image_processor
    mean = torch.tensor(config.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(config.image_std).view(1, 3, 1, 1)
    pixels = (images.double() / 255 - mean) / std
    image_features = model.get_image_features(pixel_values=pixels.float())
    tokens = processor.tokenizer(list(prompts), padding=True, return_tensors='pt')
    text_features = model.get_text_features(input_ids=tokens['input_ids'], attention_mask=tokens['attention_mask'])
    cos = F.cosine_similarity(image_features.double(), text_features.double(), dim=-1)
    return (100 * cos).numpy()


def numpy_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real))


def numpy_kid(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the polynomial kernel (x.y / D + 1)^3, written out pair by pair."""
    m, dim = len(x), x.shape[1]

    def k(u, v):
        return (u @ v / dim + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    return float(xx + yy - 2 * xy)


def random_images(n: int, size: int = 32, high: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, high, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def write_pngs(folder, images: torch.Tensor, names) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    for image, name in zip(images, names):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(os.path.join(folder, name))
    return list(names)


def extract(images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return TinyExtractor()(images).double().numpy()


def test_fid_matches_scipy_on_random_features():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(64, 8)), rng.normal(1.0, 1.5, size=(80, 8)) @ rng.normal(size=(8, 8))
    metric = GenerationMetrics(['fid'], feature_extractor=nn.Identity())
    metric.add_features(torch.from_numpy(a), real=True)
    metric.add_features(torch.from_numpy(b[:50]), real=False)
    metric.add_features(torch.from_numpy(b[50:]), real=False)
    metric.counts.update(64, real=True), metric.counts.update(80, real=False)
    assert metric.compute()['fid'] == pytest.approx(numpy_fid(a, b), rel=1e-9)


def test_fid_of_a_set_with_itself_is_zero_and_a_feature_shift_adds_its_squared_norm():
    reference = random_images(32, high=200)
    metric = GenerationMetrics(['fid'], feature_extractor=TinyExtractor())
    metric.update_reference(reference)
    metric.update_generated(reference)
    assert abs(metric.compute()['fid']) < 1e-6
    # +30 on the red channel (no clipping: pixels < 200) moves every feature by the same vector d.
    shifted = reference.clone()
    shifted[:, 0] += 30
    d = extract(shifted[:1]) - extract(reference[:1])
    metric.reset_generated()
    metric.update_generated(shifted)
    result = metric.compute()
    assert result['fid'] == pytest.approx(float((d**2).sum()), rel=1e-5)
    assert result['num_images'] == 32 and result['num_reference'] == 32  # reference kept across the reset


def test_kid_matches_an_independent_unbiased_mmd():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(12, 6)), rng.normal(0.5, 1.0, size=(12, 6))
    metric = GenerationMetrics(['kid'], feature_extractor=nn.Identity(), kid_subsets=3, kid_subset_size=12)
    metric.add_features(torch.from_numpy(x), real=True)
    metric.add_features(torch.from_numpy(y), real=False)
    metric.counts.update(12, True), metric.counts.update(12, False)
    result = metric.compute()
    # Subsets of every image: all equal, so the spread is 0.
    assert result['kid_mean'] == pytest.approx(numpy_kid(x, y), rel=1e-9)
    assert result['kid_std'] == pytest.approx(0, abs=1e-12)


def test_kid_subsets_depend_on_image_order_not_arrival_order():
    """Ranks deliver features interleaved; with the images' indices KID is that of one process."""
    rng = np.random.default_rng(2)
    x, y = torch.from_numpy(rng.normal(size=(20, 4))), torch.from_numpy(rng.normal(0.3, 1.0, size=(20, 4)))

    def kid(chunks):
        metric = GenerationMetrics(['kid'], feature_extractor=nn.Identity(), kid_subsets=7, kid_subset_size=9)
        for real, order in chunks:
            metric.add_features((x if real else y)[order], real=real, order=order)
        metric.counts.update(20, True), metric.counts.update(20, False)
        result = metric.compute()
        return result['kid_mean'], result['kid_std']

    in_order = kid([(True, torch.arange(20)), (False, torch.arange(20))])
    evens, odds = torch.arange(0, 20, 2), torch.arange(1, 20, 2)
    as_two_ranks = kid([(True, odds), (False, odds), (True, evens), (False, evens)])
    assert as_two_ranks == in_order
    assert in_order[1] > 0  # subsets of 9 of 20 differ
    shuffled = torch.randperm(20)
    without_order = GenerationMetrics(['kid'], feature_extractor=nn.Identity(), kid_subsets=7, kid_subset_size=9)
    without_order.add_features(x[shuffled], real=True), without_order.add_features(y, real=False)
    without_order.counts.update(20, True), without_order.counts.update(20, False)
    assert without_order.compute()['kid_mean'] != pytest.approx(in_order[0], rel=1e-6)


def test_clip_score_is_torchmetrics_definition_checked_by_hand(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    folder = save_tiny_clip(tmp_path / 'clip')
    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    images = random_images(4, seed=3)
    metric = GenerationMetrics(['clip_score'], clip_model=folder)
    metric.update_generated(images[:3], PROMPTS[:3])
    metric.update_generated(images[3:], PROMPTS[3:])
    scores = manual_clip_scores(model, processor, images, PROMPTS)
    assert scores.mean() > 0
    result = metric.compute()
    assert result == {'num_images': 4, 'clip_score': pytest.approx(float(scores.mean()), rel=1e-5)}
    # Pairing matters: the same images against other prompts score differently.
    shifted = PROMPTS[1:] + PROMPTS[:1]
    metric.reset_generated()
    metric.update_generated(images, shifted)
    assert metric.compute()['clip_score'] == pytest.approx(
        max(float(manual_clip_scores(model, processor, images, shifted).mean()), 0.0), rel=1e-5
    )
    # Negative mean similarity is clamped to 0 (flip the image embedding).
    with torch.no_grad():
        model.visual_projection.weight.neg_()
    model.save_pretrained(tmp_path / 'flipped')
    processor.save_pretrained(tmp_path / 'flipped')
    flipped = GenerationMetrics(['clip_score'], clip_model=str(tmp_path / 'flipped'))
    flipped.update_generated(images, PROMPTS)
    assert manual_clip_scores(model, processor, images, PROMPTS).mean() < 0
    assert flipped.compute()['clip_score'] == 0


@pytest.mark.slow
def test_inception_weights_are_converted_once_and_read_as_safetensors(tmp_path, monkeypatch):
    pytest.importorskip('torch_fidelity')
    from torch_fidelity import feature_extractor_inceptionv3 as fidelity

    def no_download(*args, **kwargs):
        raise AssertionError('tried to download InceptionV3 weights')

    # Random weights in torch-fidelity's format: build the network once with loading switched off.
    monkeypatch.setattr(fidelity, 'load_state_dict_from_url', lambda *args, **kwargs: None)
    monkeypatch.setattr(fidelity.FeatureExtractorInceptionV3, 'load_state_dict', lambda self, state: None)
    state = fidelity.FeatureExtractorInceptionV3('inception-v3-compat', ['2048']).state_dict()
    monkeypatch.undo()
    monkeypatch.setattr(fidelity, 'load_state_dict_from_url', no_download)
    pth = tmp_path / image_metrics.INCEPTION_FILE
    torch.save(state, pth)
    # It stands in for torch-fidelity's file: its SHA-256 prefix is the one the genuine file's name carries.
    monkeypatch.setattr(image_metrics, 'INCEPTION_SHA256_PREFIX', hashlib.sha256(pth.read_bytes()).hexdigest()[:8])

    out = tmp_path / 'weights' / image_metrics.INCEPTION_SAFETENSORS
    assert image_metrics.main(['convert-inception', str(pth), str(out)]) == str(out)
    extractor = build_feature_extractor(inception_weights=str(out))
    assert torch.equal(extractor.state_dict()['fc.weight'], state['fc.weight'])
    with torch.no_grad():
        assert extractor(random_images(2)).shape == (2, 2048)

    downloads = []

    def download(url, destination, hash_prefix=None, **kwargs):
        downloads.append((url, hash_prefix, os.path.dirname(destination)))
        shutil.copy(pth, destination)

    monkeypatch.setattr(torch.hub, 'download_url_to_file', download)
    image_metrics.main(['convert-inception', '--download', str(tmp_path / 'downloaded.safetensors')])
    [(url, prefix, folder)] = downloads
    assert (url, prefix) == (fidelity.URL_INCEPTION_V3, image_metrics.INCEPTION_SHA256_PREFIX)
    assert not os.path.exists(folder)  # a temporary folder, not a cache that anyone could have filled beforehand
    with pytest.raises(ValueError, match=r'need a feature extractor.*convert-inception'):
        build_feature_extractor()
    with pytest.raises(FileNotFoundError, match=r'missing\.safetensors.*does not exist.*convert-inception'):
        build_feature_extractor(inception_weights=str(tmp_path / 'missing.safetensors'))


def test_conversion_unpickles_nothing_but_torch_fidelitys_file(tmp_path, capsys):
    from tests.test_checkpointing import plant_payload

    marker = tmp_path / 'payload-ran'
    evil = plant_payload(tmp_path / image_metrics.INCEPTION_FILE, marker)  # the right name, other bytes
    out = tmp_path / image_metrics.INCEPTION_SAFETENSORS
    with pytest.raises(SystemExit):
        image_metrics.main(['convert-inception', str(evil), str(out)])
    error = capsys.readouterr().err
    assert f"{evil} is not torch-fidelity's {image_metrics.INCEPTION_FILE}: its SHA-256 " in error
    assert 'does not start with 6726825d' in error and image_metrics.INCEPTION_URL in error
    assert not marker.exists() and not out.exists()


def test_the_documented_inception_weights_are_torch_fidelitys():
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert image_metrics.INCEPTION_URL == URL_INCEPTION_V3
    assert URL_INCEPTION_V3.endswith('/' + image_metrics.INCEPTION_FILE)
    assert f'-{image_metrics.INCEPTION_SHA256_PREFIX}.pth' in image_metrics.INCEPTION_FILE
    from tests.conftest import REPO_ROOT

    for doc in ('docs/evaluation.md', 'diffusion/evaluation/metrics.py'):
        with open(os.path.join(REPO_ROOT, doc)) as f:
            text = f.read()
        assert image_metrics.INCEPTION_SAFETENSORS in text and 'pt_inception' not in text, doc


def test_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="Unknown or no metrics \\['is'\\].*fid, kid, clip_score"):
        GenerationMetrics(['fid', 'is'], feature_extractor=nn.Identity())
    with pytest.raises(ValueError, match='clip_score needs clip_model'):
        GenerationMetrics(['clip_score'])
    with pytest.raises(FileNotFoundError, match='TorchScript'):
        GenerationMetrics(['fid'], feature_extractor=str(tmp_path / 'nope.pt'))
    metric = GenerationMetrics(['fid'], feature_extractor=nn.Identity())
    with pytest.raises(ValueError, match='uint8'):
        metric.update_generated(torch.rand(2, 3, 8, 8))
    bad = GenerationMetrics(['fid'], feature_extractor=nn.Flatten(0))
    with pytest.raises(ValueError, match=r'\(N, D\) features'):
        bad.update_reference(random_images(2, size=4))


def test_to_uint8_rounds_like_diffusers_numpy_to_pil(tmp_path):
    from diffusers.image_processor import VaeImageProcessor

    images = torch.rand(2, 3, 8, 8)
    images[0, 0, 0, :4] = torch.tensor([0.5 / 255, 1.5 / 255, 2.5 / 255, 1.0])  # ties round to even
    expected = VaeImageProcessor.numpy_to_pil(images.permute(0, 2, 3, 1).numpy())
    for image, pil in zip(to_uint8(images), expected):
        pil.save(tmp_path / 'a.png')
        assert torch.equal(image, image_metrics.load_image(str(tmp_path / 'a.png')))
    assert to_uint8(images)[0, 0, 0, :4].tolist() == [0, 2, 2, 255]
    assert to_uint8(torch.tensor([-0.2, 1.3])).tolist() == [0, 255]


@pytest.fixture
def sample_folders(tmp_path):
    """8 generated images in the sampling CLI's layout, 8 reference PNGs, the tiny extractor and CLIP."""
    generated, reference = random_images(8, seed=4), random_images(8, seed=5)
    images = tmp_path / 'samples'
    rows = []
    for index in range(8):
        name = f'{index:05d}_{index}.png'
        write_pngs(images, generated[index : index + 1], [name])
        rows.append({'file': name, 'prompt_index': index, 'prompt': PROMPTS[index % 4], 'seed': index})
    with open(images / 'samples.jsonl', 'w') as f:
        for row in reversed(rows):  # any order: rows are sorted by prompt index
            f.write(json.dumps(row) + '\n')
    write_pngs(tmp_path / 'reference', reference, [f'ref{i:02d}.png' for i in range(8)])
    return dict(
        images=str(images),
        reference=str(tmp_path / 'reference'),
        generated=generated,
        reference_images=reference,
        extractor=save_extractor(tmp_path / 'extractor.pt'),
        clip=save_tiny_clip(tmp_path / 'clip'),
    )


def test_command_over_a_samples_folder_matches_independent_computations(sample_folders, tmp_path, capsys):
    from transformers import CLIPModel, CLIPProcessor

    s = sample_folders
    out = tmp_path / 'metrics.json'
    args = ['--images', s['images'], '--reference', s['reference'], '--feature-extractor', s['extractor']]
    result = main([*args, '--clip-model', s['clip'], '--fid', '--kid', '--clip-score', '--out', str(out)])
    fake, real = extract(s['generated']), extract(s['reference_images'])
    model, processor = CLIPModel.from_pretrained(s['clip']).eval(), CLIPProcessor.from_pretrained(s['clip'])
    clip = manual_clip_scores(model, processor, s['generated'], [PROMPTS[i % 4] for i in range(8)]).mean()
    assert result['fid'] == pytest.approx(numpy_fid(real, fake), rel=1e-6)
    # KID's default subset size (1000) is clamped to the 8 images: subsets of every image.
    assert result['kid_mean'] == pytest.approx(numpy_kid(real, fake), rel=1e-6)
    assert result['kid_std'] == pytest.approx(0, abs=1e-12)
    assert result['clip_score'] == pytest.approx(float(clip), rel=1e-5)
    assert (result['num_images'], result['num_reference']) == (8, 8)
    assert json.loads(out.read_text())['fid'] == result['fid']
    table = capsys.readouterr().out
    assert 'fid' in table and 'num_images' in table and f'{result["fid"]:.6f}' in table
    # A prompt file overrides the prompts of samples.jsonl, through each row's prompt_index.
    other = [f'prompt number {i}' for i in range(8)]
    (tmp_path / 'other.txt').write_text('\n'.join(other))
    overridden = main([*args, '--clip-model', s['clip'], '--clip-score', '--prompts', str(tmp_path / 'other.txt')])
    expected = max(float(manual_clip_scores(model, processor, s['generated'], other).mean()), 0.0)
    assert overridden['clip_score'] == pytest.approx(expected, rel=1e-5)
    assert 'fid' not in overridden


def test_command_with_coco_captions_compares_with_the_captioned_images_only(sample_folders, tmp_path):
    s = sample_folders
    captions = {
        'images': [{'id': i, 'file_name': f'ref{i:02d}.png'} for i in (1, 4, 6)],
        'annotations': [{'image_id': i, 'id': 10 + i, 'caption': PROMPTS[i % 4]} for i in (6, 1, 4)],
    }
    (tmp_path / 'captions_val2014.json').write_text(json.dumps(captions))
    plain = tmp_path / 'plain'  # images without samples.jsonl: paired with the captions in file-name order
    write_pngs(plain, s['generated'][:3], ['c.png', 'a.png', 'b.png'])
    result = main(
        ['--images', str(plain), '--reference', s['reference'], '--prompts', str(tmp_path / 'captions_val2014.json')]
        + ['--feature-extractor', s['extractor'], '--fid', '--clip-model', s['clip'], '--clip-score']
    )
    assert (result['num_images'], result['num_reference']) == (3, 3)
    generated_by_name = s['generated'][[1, 2, 0]]  # a.png, b.png, c.png
    expected = numpy_fid(extract(s['reference_images'][[1, 4, 6]]), extract(generated_by_name))
    assert result['fid'] == pytest.approx(expected, rel=1e-6)
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(s['clip']).eval(), CLIPProcessor.from_pretrained(s['clip'])
    clip = manual_clip_scores(model, processor, generated_by_name, [PROMPTS[1], PROMPTS[0], PROMPTS[2]]).mean()
    assert result['clip_score'] == pytest.approx(max(float(clip), 0.0), rel=1e-5)


def test_command_reads_an_mds_reference_and_resizes_to_the_resolution(synthetic_dataset, sample_folders):
    from streaming import LocalDataset

    from diffusion.data.images import decode_image

    s = sample_folders
    result = main(
        ['--images', s['images'], '--reference', synthetic_dataset, '--feature-extractor', s['extractor']]
        + ['--fid', '--resolution', '16']
    )
    dataset = LocalDataset(local=synthetic_dataset)
    reference = torch.stack([image_metrics.load_image(decode_image(sample['image']), 16) for sample in dataset])
    generated = torch.stack(
        [image_metrics.load_image(Image.fromarray(g.permute(1, 2, 0).numpy()), 16) for g in s['generated']]
    )
    assert reference.shape == (128, 3, 16, 16) and result['num_reference'] == 128
    assert result['fid'] == pytest.approx(numpy_fid(extract(reference), extract(generated)), rel=1e-6)


def test_command_errors(sample_folders, tmp_path):
    s = sample_folders
    plain = tmp_path / 'plain'
    write_pngs(plain, s['generated'][:2], ['a.png', 'b.png'])
    with pytest.raises(ValueError, match='clip_score needs prompts'):
        main(['--images', str(plain), '--clip-model', s['clip'], '--clip-score'])
    (tmp_path / 'three.txt').write_text('one\ntwo\nthree\n')
    with pytest.raises(ValueError, match='2 images.*3 prompts'):
        main(
            [
                '--images',
                str(plain),
                '--clip-model',
                s['clip'],
                '--clip-score',
                '--prompts',
                str(tmp_path / 'three.txt'),
            ]
        )
    write_pngs(plain, random_images(1, size=24), ['c.png'])
    with pytest.raises(ValueError, match=r'different sizes.*pass a resolution'):
        main(['--images', str(plain), '--reference', s['reference'], '--feature-extractor', s['extractor'], '--fid'])
    with pytest.raises(ValueError, match='FID and KID need reference images'):
        main(['--images', str(plain), '--feature-extractor', s['extractor'], '--fid', '--resolution', '16'])
    with pytest.raises(SystemExit):
        main(['--images', str(plain)])  # no metric can be computed
    with pytest.raises(SystemExit):
        main(['--images', str(plain), '--checkpoint', 'ckpt.pt', '--clip-model', s['clip']])  # nothing to sample


@pytest.mark.slow
def test_command_samples_a_checkpoint_into_the_folder_first(sample_folders, tmp_path):
    pytest.importorskip('diffusion.inference.sample')
    from tests.conftest import build_tiny_sd

    s = sample_folders
    model = build_tiny_sd()
    model.pipeline().save_pretrained(tmp_path / 'pipeline', safe_serialization=True)  # load_model reads this too
    (tmp_path / 'prompts.txt').write_text('\n'.join(PROMPTS))
    out = tmp_path / 'sampled'
    result = main(
        ['--checkpoint', str(tmp_path / 'pipeline'), '--prompts', str(tmp_path / 'prompts.txt'), '--images', str(out)]
        + ['--reference', s['reference'], '--feature-extractor', s['extractor'], '--fid', '--resolution', '32']
        + ['--num-inference-steps', '2', '--guidance-scale', '3.0', '--seed', '5', '--batch-size', '4']
        + ['--device', 'cpu']
    )
    rows = [json.loads(line) for line in (out / 'samples.jsonl').read_text().splitlines()]
    # Prompt i gets seed 5 + i, as the image_metrics callback draws it.
    assert [(row['prompt_index'], row['prompt'], row['seed']) for row in rows] == [
        (i, PROMPTS[i], 5 + i) for i in range(4)
    ]
    # One batch of 4, as sampled: float noise between batch sizes (~1e-6) could flip a rounding.
    expected = model.generate(
        PROMPTS, seed=[5, 6, 7, 8], num_inference_steps=2, guidance_scale=3.0, height=32, width=32
    )
    generated = torch.stack([image_metrics.load_image(str(out / row['file'])) for row in rows])
    assert torch.equal(generated, to_uint8(expected))
    assert result['num_images'] == 4
    assert result['fid'] == pytest.approx(numpy_fid(extract(s['reference_images']), extract(generated)), rel=1e-6)


def test_a_folder_without_an_index_is_every_image_but_the_contact_sheet(tmp_path):
    write_pngs(tmp_path / 'sub', random_images(1), ['c.png'])
    write_pngs(tmp_path, random_images(3), ['b.png', 'a.png', 'contact_sheet.png'])
    assert [row['file'] for row in image_metrics.read_samples(str(tmp_path))] == ['a.png', 'b.png', 'sub/c.png']


def test_a_pickled_inception_weights_file_never_runs(sample_folders, tmp_path):
    # torch-fidelity reads a weights path with torch.load(weights_only=False): a planted file would run.
    from diffusion.callbacks.image_metrics import ImageMetrics
    from tests.test_checkpointing import plant_payload

    marker = tmp_path / 'payload-ran'
    evil = str(plant_payload(tmp_path / 'pt_inception-2015-12-05-6726825d.pth', marker))
    s = sample_folders
    attempts = {
        'library': lambda: build_feature_extractor(inception_weights=evil),
        'command': lambda: main(
            ['--images', s['images'], '--reference', s['reference'], '--fid', '--inception-weights', evil]
        ),
        'callback': lambda: ImageMetrics(reference=s['reference'], metrics=['fid'], inception_weights=evil),
    }
    for name, attempt in attempts.items():
        with pytest.raises(ValueError, match=rf'{re.escape(evil)} is not a \.safetensors file') as error:
            attempt()
        assert 'convert-inception' in str(error.value), name
        assert not marker.exists(), name
    disguised = str(plant_payload(tmp_path / 'inception.safetensors', marker))
    with pytest.raises(ValueError, match=rf'{re.escape(disguised)} is not a readable safetensors file'):
        build_feature_extractor(inception_weights=disguised)
    assert not marker.exists()


def test_a_reference_folder_leaves_out_the_projects_own_outputs(sample_folders, tmp_path):
    # A sampling command's folder used as reference held 72 samples and the contact sheet: 73 "references".
    s = sample_folders
    reference = tmp_path / 'reference_run'
    write_pngs(reference, s['reference_images'][:3], ['00000_0.png', '00001_0.png', 'contact_sheet.png'])
    write_pngs(reference / 'batch_0000002', s['reference_images'][3:6], ['00000_0.png', 'contact_sheet.png', 'x.png'])
    write_pngs(reference, s['reference_images'][6:7], ['00002_0.png.tmp.png'])  # a write that was killed
    names = [os.path.relpath(path, reference) for path in image_metrics.open_reference(str(reference)).paths]
    assert names == ['00000_0.png', '00001_0.png', 'batch_0000002/00000_0.png', 'batch_0000002/x.png']
    args = ['--images', s['images'], '--reference', str(reference), '--feature-extractor', s['extractor'], '--fid']
    assert main(args)['num_reference'] == 4
