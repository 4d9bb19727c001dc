"""Automatic image metrics: FID and KID against reference images, CLIP score against prompts.

Built on torchmetrics' ``FrechetInceptionDistance``, ``KernelInceptionDistance`` and ``CLIPScore``: the
features are extracted once per batch and handed to FID and KID, whose states (and torchmetrics' own
``dist_sync``) accumulate them, so the same code serves one process over a folder and many ranks during training
(:class:`~diffusion.callbacks.image_metrics.ImageMetrics`). KID's subsets are drawn with a fixed seed from the
features in image order, so its value does not depend on how many ranks produced them.

Feature extractors load from local files; nothing downloads unless asked for:

* FID/KID: torch-fidelity's InceptionV3 (as torchmetrics uses it) from ``inception_weights``, a ``.safetensors``
  file converted once from torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` with
  ``python -m diffusion.evaluation.image_metrics convert-inception`` (:func:`convert_inception`): torch-fidelity
  reads a weights path with ``torch.load(weights_only=False)``, which runs any code pickled in the file, and
  publishes no full hash of it to pin. Or any module mapping uint8 images (N, 3, H, W) to features (N, D), given as
  a module or a TorchScript file (``feature_extractor``).
* CLIP score: a ``transformers`` ``CLIPModel`` + ``CLIPProcessor`` folder (``clip_model``). As torchmetrics
  defines it, the score is ``max(100 * mean cos(image, prompt), 0)`` over all images.

Images enter as uint8, exactly as a PNG stores them, so a metric computed in memory during training equals the
metric computed later from the saved files.

The command line, which can also sample a checkpoint first, is :mod:`diffusion.evaluation.metrics`
(``python -m diffusion.evaluation.metrics``); this module is the library that it and the training callback share,
and it imports nothing of inference.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
import tempfile
import threading
import warnings
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from PIL import Image
from torch import nn
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance, poly_mmd
from torchmetrics.multimodal.clip_score import CLIPScore
from torchmetrics.utilities.data import dim_zero_cat
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from tqdm import tqdm

from diffusion.data.images import decode_image
from diffusion.evaluation.sample_folder import SAMPLES_FILE, is_sample_image, read_samples_file

__all__ = [
    'CONVERT_INCEPTION_COMMAND',
    'INCEPTION_FILE',
    'INCEPTION_URL',
    'METRIC_NAMES',
    'FolderImages',
    'GenerationMetrics',
    'MDSImages',
    'convert_inception',
    'evaluate_folder',
    'load_inception',
    'load_image',
    'open_reference',
    'read_samples',
    'to_uint8',
    'update_from_source',
]

METRIC_NAMES = ('fid', 'kid', 'clip_score')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp')
# torch-fidelity's InceptionV3 weights (its URL_INCEPTION_V3, which it downloads when given no path). The name
# carries, as torch.hub names files, the first 8 hex digits of the file's SHA-256; no full hash is published.
INCEPTION_URL = (
    'https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth'
)
INCEPTION_FILE = 'weights-inception-2015-12-05-6726825d.pth'
INCEPTION_SHA256_PREFIX = '6726825d'
INCEPTION_SAFETENSORS = 'weights-inception-2015-12-05-6726825d.safetensors'
CONVERT_INCEPTION_COMMAND = 'python -m diffusion.evaluation.image_metrics convert-inception'
# torch-fidelity's extractor downloads weights through this module global when given no path: swapped, under a lock,
# to hand it weights read from safetensors instead.
_FIDELITY_LOCK = threading.Lock()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> uint8, rounded as diffusers' ``numpy_to_pil`` and the sampling command round."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def load_image(image: Union[str, Image.Image], resolution: Optional[int] = None) -> torch.Tensor:
    """A uint8 image (3, H, W) from a file or PIL image; ``resolution`` resizes the short side and centre-crops.

    An image already ``resolution`` pixels square is left untouched, so saved samples read back bit-exact.
    """
    if isinstance(image, str):
        with Image.open(image) as opened:
            image = opened.convert('RGB')
    else:
        image = image.convert('RGB')
    if resolution is not None and image.size != (resolution, resolution):
        image = TF.resize(image, resolution, interpolation=InterpolationMode.BICUBIC, antialias=True)
        image = TF.center_crop(image, resolution)
    return TF.pil_to_tensor(image)


class FolderImages:
    """Images from a list of files, indexable like a sequence of PIL images.

    Args:
        paths (Sequence[str]): Image files, in the order that indices refer to.
    """

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)
        missing = [path for path in self.paths if not os.path.isfile(path)]
        if missing:
            raise FileNotFoundError(f'{len(missing)} image files are missing, e.g. {missing[0]}.')

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Image.Image:
        with Image.open(self.paths[index]) as image:
            return image.convert('RGB')

    def name(self, index: int) -> str:
        return self.paths[index]


class MDSImages:
    """Images from a local MDS dataset (streaming's ``LocalDataset``), e.g. a training set's shards.

    Args:
        path (str): Local folder holding ``index.json``.
        column (str): Column holding the image (encoded bytes or a PIL image). Default: ``'image'``.
    """

    def __init__(self, path: str, column: str = 'image'):
        from streaming import LocalDataset

        self.path, self.column = path, column
        self.dataset = LocalDataset(local=path)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Image.Image:
        sample = self.dataset[index]
        if self.column not in sample:
            raise ValueError(f'{self.path}: no column {self.column!r}. Columns: {", ".join(sorted(sample))}.')
        value = sample[self.column]
        return value if isinstance(value, Image.Image) else decode_image(value, filename=f'{self.path}[{index}]')

    def name(self, index: int) -> str:
        return f'{self.path}[{index}]'


def list_images(folder: str) -> list[str]:
    """Image files under ``folder`` (recursively), sorted by relative path, without the sample-folder layout's own
    images that are not samples (contact sheets, partial writes: :func:`~diffusion.evaluation.sample_folder.
    is_sample_image`), which would otherwise count as reference or generated images."""
    found = []
    for root, _, files in os.walk(folder):
        found += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS) and is_sample_image(f)]
    return sorted(found, key=lambda path: os.path.relpath(path, folder))


def open_reference(
    path: str, files: Optional[Sequence[str]] = None, column: str = 'image'
) -> Union[FolderImages, MDSImages]:
    """Reference images: a folder of images (or only ``files`` in it, e.g. COCO's) or a local MDS dataset."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f'Reference {path!r} is not a folder (of images, or an MDS dataset with index.json).')
    if os.path.isfile(os.path.join(path, 'index.json')):
        return MDSImages(path, column=column)
    if files is not None:
        return FolderImages([os.path.join(path, name) for name in dict.fromkeys(files)])
    paths = list_images(path)
    if not paths:
        raise ValueError(f'No images ({", ".join(IMAGE_EXTENSIONS)}) under reference folder {path!r}.')
    return FolderImages(paths)


def read_samples(folder: str) -> list[dict[str, Any]]:
    """The images of a samples folder: rows of ``samples.jsonl`` sorted by (prompt_index, seed), else every image
    but the contact sheet.

    Returns:
        list[dict]: Rows with ``file`` (relative to ``folder``) and, from ``samples.jsonl``, ``prompt_index``,
        ``prompt`` and ``seed``.
    """
    index = os.path.join(folder, SAMPLES_FILE)
    if not os.path.isfile(index):
        rows = [{'file': os.path.relpath(path, folder)} for path in list_images(folder)]
        if not rows:
            raise ValueError(f'No images ({", ".join(IMAGE_EXTENSIONS)}) and no {SAMPLES_FILE} in {folder!r}.')
        return rows
    rows = read_samples_file(index)
    return sorted(rows, key=lambda row: (row.get('prompt_index', 0), row.get('seed', 0), row['file']))


def _how_to_get_inception() -> str:
    return (
        f"Convert torch-fidelity's {INCEPTION_FILE} once: {CONVERT_INCEPTION_COMMAND} --download "
        f'{INCEPTION_SAFETENSORS}; offline, download {INCEPTION_URL} on a machine that can, copy it here and run '
        f'{CONVERT_INCEPTION_COMMAND} {INCEPTION_FILE} {INCEPTION_SAFETENSORS}.'
    )


@contextlib.contextmanager
def _fidelity_weights(state: dict[str, torch.Tensor]):
    """torch-fidelity's InceptionV3, built inside, loads ``state`` (strictly) instead of downloading or unpickling."""
    from torch_fidelity import feature_extractor_inceptionv3 as fidelity

    with _FIDELITY_LOCK:
        download = fidelity.load_state_dict_from_url
        fidelity.load_state_dict_from_url = lambda *args, **kwargs: state
        try:
            yield
        finally:
            fidelity.load_state_dict_from_url = download


def _inception(state: dict[str, torch.Tensor], source: str) -> nn.Module:
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        with _fidelity_weights(state):
            return NoTrainInceptionV3(name='inception-v3-compat', features_list=['2048'])
    except RuntimeError as error:  # load_state_dict: other names or shapes
        raise ValueError(f"{source} does not hold torch-fidelity's InceptionV3 weights: {error}") from None


def load_inception(weights: str) -> nn.Module:
    """torch-fidelity's InceptionV3 (torchmetrics' ``NoTrainInceptionV3``, 2048 features) with weights read from a
    ``.safetensors`` file, which holds only tensors: nothing in it can run.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Not a ``.safetensors`` file (a ``.pth`` is a pickle, never opened: the message says how to
            convert torch-fidelity's file), or not InceptionV3's weights.
    """
    if not os.path.isfile(weights):
        raise FileNotFoundError(f'InceptionV3 weights file {weights!r} does not exist. {_how_to_get_inception()}')
    if not weights.endswith('.safetensors'):
        raise ValueError(
            f'{weights} is not a .safetensors file: InceptionV3 weights are read only as safetensors, never '
            f'unpickled (a .pth runs any code pickled in it). {_how_to_get_inception()}'
        )
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(weights)
    except SafetensorError as error:
        raise ValueError(f'{weights} is not a readable safetensors file ({error}). {_how_to_get_inception()}') from None
    return _inception(state, weights)


def convert_inception(source: Optional[str], out: str) -> str:
    """Convert torch-fidelity's InceptionV3 weights file to safetensors, the only form evaluation reads.

    Run it on the file from torch-fidelity's release (:data:`INCEPTION_URL`), or with ``source=None`` to download it
    from there (to a temporary folder, never a cache another process could have written to). The file must hash to
    the SHA-256 prefix in its name before it is unpickled, and then only with ``weights_only=True``; the weights are
    checked against InceptionV3 before ``out`` is written.

    Returns:
        str: ``out``.

    Raises:
        ValueError: The file's SHA-256 does not start with the prefix in torch-fidelity's file name (nothing is
            unpickled), or it does not hold InceptionV3's weights.
    """
    if source is None:
        with tempfile.TemporaryDirectory() as folder:
            downloaded = os.path.join(folder, INCEPTION_FILE)
            torch.hub.download_url_to_file(INCEPTION_URL, downloaded, hash_prefix=INCEPTION_SHA256_PREFIX)
            return convert_inception(downloaded, out)
    digest = hashlib.sha256()
    with open(source, 'rb') as f:
        while chunk := f.read(16 * 1024 * 1024):
            digest.update(chunk)
    if not digest.hexdigest().startswith(INCEPTION_SHA256_PREFIX):
        raise ValueError(
            f"{source} is not torch-fidelity's {INCEPTION_FILE}: its SHA-256 {digest.hexdigest()} does not start with "
            f"{INCEPTION_SHA256_PREFIX}, the hash prefix in that file's name; not unpickled. Download it from "
            f'{INCEPTION_URL}, or run {CONVERT_INCEPTION_COMMAND} --download {out}.'
        )
    state = torch.load(source, map_location='cpu', weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f'{source} is not a state dict of tensors.')
    _inception(state, source)  # the names and shapes fit
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tensors = {name: tensor.detach().clone().contiguous() for name, tensor in state.items()}
    save_file(tensors, out, metadata={'source': INCEPTION_URL, 'source_sha256': digest.hexdigest()})
    return out


def build_feature_extractor(
    feature_extractor: Union[nn.Module, str, None] = None, inception_weights: Optional[str] = None
) -> nn.Module:
    """The FID/KID feature extractor: a module, a TorchScript file, or InceptionV3 weights as ``.safetensors``."""
    if isinstance(feature_extractor, nn.Module):
        return feature_extractor.eval()
    if feature_extractor is not None:
        if not os.path.isfile(feature_extractor):
            raise FileNotFoundError(f'Feature extractor {feature_extractor!r} is not a (TorchScript) file.')
        return torch.jit.load(feature_extractor, map_location='cpu').eval()
    if inception_weights is None:
        raise ValueError(
            "FID and KID need a feature extractor: inception_weights=PATH (torch-fidelity's InceptionV3 weights as "
            f'{INCEPTION_SAFETENSORS}) or feature_extractor=<module or TorchScript file>. {_how_to_get_inception()}'
        )
    return load_inception(inception_weights)


def build_clip_score(clip_model: str) -> CLIPScore:
    """torchmetrics' ``CLIPScore`` on a ``CLIPModel`` + ``CLIPProcessor`` folder (or hub id, if allowed to load)."""

    def load():
        from transformers import CLIPModel, CLIPProcessor

        return CLIPModel.from_pretrained(clip_model).eval(), CLIPProcessor.from_pretrained(clip_model)

    return CLIPScore(model_name_or_path=load)


class _Features(nn.Module):
    """Pass-through extractor: FID and KID receive features already extracted (once for both)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


class _OrderedKID(KernelInceptionDistance):
    """KID whose subsets do not depend on the order features arrived in, nor on the number of ranks.

    Each feature row carries its image index; ``compute`` sorts by it after torchmetrics gathers the ranks' rows,
    then draws subsets with a fixed-seed generator. A subset size above the image count is clamped to it.
    """

    def __init__(self, num_features: int, subsets: int, subset_size: int, seed: int):
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # "saves all features in buffer": the design of KID
            super().__init__(
                feature=_Features(num_features), subsets=subsets, subset_size=subset_size, reset_real_features=False
            )
        self.seed = seed
        # 'cat' rather than torchmetrics' None: one gather per state, however many updates each rank made.
        for kind in ('real', 'fake'):
            self.add_state(f'{kind}_features', [], dist_reduce_fx='cat')
            self.add_state(f'{kind}_order', [], dist_reduce_fx='cat')

    def update(self, features: torch.Tensor, real: bool, order: torch.Tensor) -> None:  # type: ignore[override]
        (self.real_features if real else self.fake_features).append(features)
        (self.real_order if real else self.fake_order).append(order.to(device=features.device, dtype=torch.long))

    def _ordered(self, kind: str) -> torch.Tensor:
        features = dim_zero_cat(getattr(self, f'{kind}_features'))
        order = dim_zero_cat(getattr(self, f'{kind}_order'))
        return features[torch.argsort(order, stable=True)]

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        real, fake = self._ordered('real'), self._ordered('fake')
        subset_size = min(self.subset_size, len(real), len(fake))
        if subset_size < 2:
            raise ValueError(f'KID needs at least 2 reference and 2 generated images, got {len(real)} and {len(fake)}.')
        if subset_size < self.subset_size:
            warnings.warn(
                f'KID subset_size {self.subset_size} exceeds the image count; using subsets of {subset_size} '
                f'({len(fake)} generated, {len(real)} reference images).',
                stacklevel=2,
            )
        generator = torch.Generator().manual_seed(self.seed)
        scores = []
        for _ in range(self.subsets):
            real_subset = real[torch.randperm(len(real), generator=generator)[:subset_size].to(real.device)]
            fake_subset = fake[torch.randperm(len(fake), generator=generator)[:subset_size].to(fake.device)]
            scores.append(poly_mmd(real_subset, fake_subset, self.degree, self.gamma, self.coef))
        stacked = torch.stack(scores)
        return stacked.mean(), stacked.std(unbiased=False)

    def reset(self) -> None:
        # Metric.reset empties list states in place (list.clear), so the reference states are left out of it
        # rather than kept by reference; torchmetrics' own KID does the same for its single real state.
        kept = {name: self._defaults.pop(name) for name in ('real_features', 'real_order')}
        try:
            Metric.reset(self)
        finally:
            self._defaults.update(kept)


class _ImageCounts(Metric):
    """Generated and reference image counts, summed over ranks like the metrics they go with."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state('num_images', torch.tensor(0), dist_reduce_fx='sum')
        self.add_state('num_reference', torch.tensor(0), dist_reduce_fx='sum')

    def update(self, count: int, real: bool) -> None:
        if real:
            self.num_reference += count
        else:
            self.num_images += count

    def compute(self) -> tuple[int, int]:
        return int(self.num_images), int(self.num_reference)

    def reset(self) -> None:
        kept = self.num_reference
        super().reset()
        self.num_reference = kept


class GenerationMetrics(nn.Module):
    """FID, KID and CLIP score of generated images, accumulated batch by batch (and across ranks).

    Reference features persist across :meth:`reset_generated`, so a training run extracts them once.

    Args:
        metrics (Sequence[str]): Any of ``'fid'``, ``'kid'``, ``'clip_score'``. Default: all three.
        feature_extractor (nn.Module | str, optional): FID/KID extractor: a module mapping uint8 images
            (N, 3, H, W) to features (N, D), or a TorchScript file of one. Default: InceptionV3.
        inception_weights (str, optional): torch-fidelity's InceptionV3 weights as a ``.safetensors`` file
            (:func:`convert_inception`).
        clip_model (str, optional): ``CLIPModel`` + ``CLIPProcessor`` folder; needed for ``'clip_score'``.
        float_input (bool): Give ``feature_extractor`` float images in [0, 1] instead of uint8. Default: ``False``.
        kid_subsets (int): KID subsets. Default: ``100``.
        kid_subset_size (int): Images per KID subset, clamped to the image count. Default: ``1000``.
        kid_seed (int): Seed of the KID subsets. Default: ``0``.
    """

    def __init__(
        self,
        metrics: Sequence[str] = METRIC_NAMES,
        feature_extractor: Union[nn.Module, str, None] = None,
        inception_weights: Optional[str] = None,
        clip_model: Optional[str] = None,
        float_input: bool = False,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        kid_seed: int = 0,
    ):
        super().__init__()
        self.metrics = tuple(dict.fromkeys(metrics))
        unknown = [name for name in self.metrics if name not in METRIC_NAMES]
        if unknown or not self.metrics:
            raise ValueError(
                f'Unknown or no metrics {unknown or list(metrics)}. Valid metrics: {", ".join(METRIC_NAMES)}.'
            )
        self.extractor = None
        if 'fid' in self.metrics or 'kid' in self.metrics:
            self.extractor = build_feature_extractor(feature_extractor, inception_weights)
        self.clip_score = None
        if 'clip_score' in self.metrics:
            if clip_model is None:
                raise ValueError('clip_score needs clip_model: a folder holding a CLIPModel and its CLIPProcessor.')
            self.clip_score = build_clip_score(clip_model)
        self.float_input = float_input
        self.kid_options = dict(subsets=kid_subsets, subset_size=kid_subset_size, seed=kid_seed)
        self.fid: Optional[FrechetInceptionDistance] = None  # built at the first features, when D is known
        self.kid: Optional[_OrderedKID] = None
        self.counts = _ImageCounts()
        self._next_order = {True: 0, False: 0}

    @property
    def needs_reference(self) -> bool:
        """Whether the metrics compare with reference images (FID, KID)."""
        return self.extractor is not None

    @property
    def has_reference(self) -> bool:
        """Whether this rank has added reference images."""
        return int(self.counts.num_reference) > 0

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """FID/KID features (N, D), float64, of uint8 images (N, 3, H, W)."""
        assert self.extractor is not None, 'features need fid or kid'
        inputs = images.to(self.counts.device)
        features = self.extractor(inputs.float() / 255 if self.float_input else inputs)
        features = features[0] if isinstance(features, (tuple, list)) else features
        if features.ndim != 2 or features.shape[0] != images.shape[0]:
            raise ValueError(f'The feature extractor must return (N, D) features, got {tuple(features.shape)}.')
        return features.double()

    def add_features(self, features: torch.Tensor, real: bool, order: Optional[torch.Tensor] = None) -> None:
        """Add features (N, D) of reference (``real``) or generated images; ``order`` are the images' indices."""
        if order is None:
            order = torch.arange(self._next_order[real], self._next_order[real] + len(features))
        if len(order):
            self._next_order[real] = max(self._next_order[real], int(order.max()) + 1)
        if self.fid is None and 'fid' in self.metrics:
            self.fid = FrechetInceptionDistance(feature=_Features(features.shape[1]), reset_real_features=False)
            self.fid.to(features.device)
        if self.kid is None and 'kid' in self.metrics:
            self.kid = _OrderedKID(features.shape[1], **self.kid_options).to(features.device)
        if self.fid is not None:
            self.fid.update(features, real=real)
        if self.kid is not None:
            self.kid.update(features, real=real, order=order)

    @torch.no_grad()
    def update_reference(self, images: torch.Tensor, order: Optional[torch.Tensor] = None) -> None:
        """Add reference images, uint8 (N, 3, H, W); a no-op without FID and KID."""
        if self.needs_reference:
            self.add_features(self.features(images), real=True, order=order)
            self.counts.update(len(images), real=True)

    @torch.no_grad()
    def update_generated(
        self, images: torch.Tensor, prompts: Optional[Sequence[str]] = None, order: Optional[torch.Tensor] = None
    ) -> None:
        """Add generated images, uint8 (N, 3, H, W), with their prompts (needed for the CLIP score)."""
        if images.dtype != torch.uint8:
            raise ValueError(f'Images must be uint8 (see to_uint8), got {images.dtype}.')
        images = images.to(self.counts.device)  # torchmetrics runs CLIP where the images are
        if self.needs_reference:
            self.add_features(self.features(images), real=False, order=order)
        if self.clip_score is not None:
            if prompts is None or len(prompts) != len(images):
                raise ValueError(f'clip_score needs one prompt per image: {len(images)} images, prompts={prompts!r}.')
            self.clip_score.update(images, list(prompts))
        self.counts.update(len(images), real=False)

    def compute(self) -> dict[str, float]:
        """The metrics (synchronised over ranks: every rank must call it) with the image counts."""
        num_images, num_reference = self.counts.compute()
        result: dict[str, float] = {'num_images': num_images}
        if self.needs_reference:
            result['num_reference'] = num_reference
            if min(num_images, num_reference) < 2:
                raise ValueError(
                    f'FID and KID need at least 2 generated and 2 reference images, got {num_images} and '
                    f'{num_reference}.'
                )
        if self.fid is not None:
            result['fid'] = float(self.fid.compute())
        if self.kid is not None:
            kid_mean, kid_std = self.kid.compute()
            result.update(kid_mean=float(kid_mean), kid_std=float(kid_std))
        if self.clip_score is not None:
            result['clip_score'] = float(self.clip_score.compute())
        return result

    def reset_generated(self) -> None:
        """Forget the generated images; the reference images stay."""
        for metric in (self.fid, self.kid, self.clip_score, self.counts):
            if metric is not None:
                metric.reset()
        self._next_order[False] = 0


def update_from_source(
    metrics: GenerationMetrics,
    source: Union[FolderImages, MDSImages],
    indices: Sequence[int],
    real: bool,
    resolution: Optional[int] = None,
    batch_size: int = 32,
    prompts: Optional[Sequence[str]] = None,
    progress: bool = True,
) -> None:
    """Add the images ``source[i]`` for ``i in indices`` (with ``prompts[i]`` when generated) in batches."""
    desc = 'reference images' if real else 'generated images'
    for start in tqdm(range(0, len(indices), batch_size), desc=desc, disable=not progress, leave=False):
        batch = list(indices[start : start + batch_size])
        images = [load_image(source[i], resolution) for i in batch]
        sizes = {tuple(image.shape[1:]) for image in images}
        if len(sizes) > 1:
            raise ValueError(
                f'Images of different sizes {sorted(sizes)} (e.g. {source.name(batch[0])}); pass a resolution to '
                'resize and centre-crop them.'
            )
        order = torch.tensor(batch)
        if real:
            metrics.update_reference(torch.stack(images), order=order)
        else:
            metrics.update_generated(
                torch.stack(images), None if prompts is None else [prompts[i] for i in batch], order
            )


def _prompts_for_rows(rows: list[dict], prompts: Optional[Sequence[str]], folder: str) -> list[Optional[str]]:
    """Each row's prompt: ``prompts[prompt_index]`` (or in order when rows lack indices), else the row's own."""
    if prompts is None:
        return [row.get('prompt') for row in rows]
    if all('prompt_index' in row for row in rows):
        bad = [row['prompt_index'] for row in rows if not 0 <= row['prompt_index'] < len(prompts)]
        if bad:
            raise ValueError(f'{folder}: prompt_index {bad[0]} is out of range for {len(prompts)} prompts.')
        return [prompts[row['prompt_index']] for row in rows]
    if len(rows) != len(prompts):
        raise ValueError(
            f'{folder} has {len(rows)} images and no {SAMPLES_FILE}, but {len(prompts)} prompts were given; '
            'expected one image per prompt (in file-name order).'
        )
    return list(prompts)


def evaluate_folder(
    metrics: GenerationMetrics,
    images: str,
    reference: Optional[str] = None,
    prompts: Optional[Sequence[str]] = None,
    reference_files: Optional[Sequence[str]] = None,
    reference_column: str = 'image',
    num_reference: Optional[int] = None,
    resolution: Optional[int] = None,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, float]:
    """Metrics of a folder of generated images (the sampling CLI's layout, or just images).

    Args:
        metrics (GenerationMetrics): The metrics to fill; call on a fresh one.
        images (str): Folder of generated images, with ``samples.jsonl`` (file, prompt_index, prompt, seed).
        reference (str, optional): Reference images for FID/KID: a folder, or a local MDS dataset.
        prompts (Sequence[str], optional): Prompts, indexed by the rows' ``prompt_index``; default: the rows'.
        reference_files (Sequence[str], optional): Only these files of the ``reference`` folder (COCO).
        reference_column (str): Image column of an MDS reference. Default: ``'image'``.
        num_reference (int, optional): Use the first ``num_reference`` reference images. Default: all.
        resolution (int, optional): Resize and centre-crop every image to this size.
        batch_size (int): Images per batch. Default: ``32``.
        progress (bool): Show progress bars. Default: ``True``.

    Returns:
        dict[str, float]: ``fid``, ``kid_mean``, ``kid_std``, ``clip_score`` (those asked for), ``num_images``,
        ``num_reference``.
    """
    rows = read_samples(images)
    row_prompts = _prompts_for_rows(rows, prompts, images)
    if metrics.clip_score is not None and any(prompt is None for prompt in row_prompts):
        raise ValueError(f'clip_score needs prompts: {images} has no {SAMPLES_FILE} with prompts; pass prompts.')
    if metrics.needs_reference:
        if reference is None:
            raise ValueError('FID and KID need reference images (a folder or an MDS dataset).')
        source = open_reference(reference, reference_files, column=reference_column)
        count = len(source) if num_reference is None else min(len(source), num_reference)
        update_from_source(metrics, source, range(count), True, resolution, batch_size, progress=progress)
    generated = FolderImages([os.path.join(images, row['file']) for row in rows])
    indices = range(len(generated))
    update_from_source(metrics, generated, indices, False, resolution, batch_size, row_prompts, progress)
    return metrics.compute()


def main(argv: Optional[Sequence[str]] = None) -> str:
    """``python -m diffusion.evaluation.image_metrics convert-inception [PTH | --download] OUT``."""
    parser = argparse.ArgumentParser(prog='python -m diffusion.evaluation.image_metrics')
    commands = parser.add_subparsers(dest='command', required=True)
    convert = commands.add_parser(
        'convert-inception',
        help=f"Convert torch-fidelity's {INCEPTION_FILE} (from {INCEPTION_URL}) to the safetensors file FID/KID read.",
    )
    convert.add_argument('paths', nargs='+', metavar='PATH', help=f'[{INCEPTION_FILE}] {INCEPTION_SAFETENSORS}')
    convert.add_argument('--download', action='store_true', help='Download the .pth from torch-fidelity first.')
    args = parser.parse_args(argv)
    if len(args.paths) != (1 if args.download else 2):
        parser.error('convert-inception takes PTH OUT, or --download OUT.')
    source, out = (None, args.paths[0]) if args.download else args.paths
    try:
        convert_inception(source, out)
    except (OSError, ValueError) as error:
        parser.exit(1, f'convert-inception: {error}\n')
    print(f'wrote {out}: use it as --inception-weights / inception_weights', file=sys.stderr)
    return out


if __name__ == '__main__':
    main()
