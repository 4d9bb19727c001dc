"""A deterministic prompt-following checker for the synthetic shapes data set.

Models trained on :mod:`diffusion.data.synthetic` see captions such as "two large blue squares on
a noisy beige background". Because those images have a single saturated foreground colour and a
single shape on a low-saturation background, we can check a generated image against its prompt
without a learned judge (no CLIP score, no download): segment the saturated pixels, vote on their
hue for the colour, and match the largest blob against ideal shape templates for the shape.

Built on NumPy (HSV conversion, hue voting), ``scipy.ndimage`` (connected components, hole
filling) and PIL ``ImageDraw`` (shape templates). Palette and shape names come from
:mod:`diffusion.data.synthetic`, so generator and checker cannot drift apart. The colours the checker votes among
are the palette's eight by default; ``colors=`` adds the generator's :data:`~diffusion.data.synthetic.NEW_COLORS`
(the fine-tuning demo's new concept), so that an image in the new colour is not counted as its nearest old one.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage

from diffusion.data.synthetic import NEW_COLORS, PALETTE, SHAPES

__all__ = [
    'DEMO_PROMPTS_PATH',
    'FINETUNE_COLORS',
    'FINETUNE_PROMPTS_PATH',
    'ImageLike',
    'dominant_color',
    'dominant_shape',
    'foreground_mask',
    'load_prompts',
    'parse_prompt',
    'score_prompt_following',
]

# Everything the checker accepts as one image.
ImageLike = Image.Image | np.ndarray | torch.Tensor

DEMO_PROMPTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'prompts', 'demo.txt')
#: The fine-tuning demo's new-concept prompts (the new colour in every shape).
FINETUNE_PROMPTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'prompts', 'demo_finetune.txt')
#: The colours the fine-tuning demo's checker votes among: the palette and the new colours.
FINETUNE_COLORS: tuple[str, ...] = (*PALETTE, *NEW_COLORS)

# Backgrounds in the synthetic data have HSV saturation <= 0.25 and objects >= 0.7, so a threshold
# in between separates them; anti-aliased edges (object blended with background) fall either way.
SATURATION_THRESHOLD = 0.4
# Very dark pixels have unreliable hue (tiny RGB differences dominate), so they are not foreground.
VALUE_THRESHOLD = 0.25
# Below this foreground fraction we say "no object": the smallest synthetic object (a small
# triangle) covers ~3% of the image.
MIN_FOREGROUND_FRACTION = 0.02

_PALETTE_NAMES = tuple(PALETTE)
_ALL_COLORS = {**PALETTE, **NEW_COLORS}
_SHAPE_WORDS = {**{shape: shape for shape in SHAPES}, **{f'{shape}s': shape for shape in SHAPES}}


def _rgb_to_hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised RGB -> HSV for float arrays in ``[0, 1]``; hue in degrees ``[0, 360)``."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = rgb.max(axis=-1)
    chroma = value - rgb.min(axis=-1)
    saturation = np.where(value > 0, chroma / np.maximum(value, 1e-12), 0.0)
    safe = np.maximum(chroma, 1e-12)
    hue = np.where(
        value == r,
        ((g - b) / safe) % 6,
        np.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4),
    )
    return (hue * 60.0) % 360.0, saturation, value


@lru_cache(maxsize=16)
def _color_hues(colors: tuple[str, ...]) -> np.ndarray:
    rgb = np.asarray([_ALL_COLORS[name] for name in colors], dtype=np.float64) / 255.0
    return _rgb_to_hsv(rgb)[0]


def _color_names(colors: Sequence[str] | None) -> tuple[str, ...]:
    """The colours to vote among (default: the palette), each checked against the generator's colours."""
    if colors is None:
        return _PALETTE_NAMES
    names = tuple(colors)
    unknown = [name for name in names if name not in _ALL_COLORS]
    if unknown or not names:
        raise ValueError(f'colors {unknown or names} are not colours of the generator: {", ".join(_ALL_COLORS)}.')
    return names


def _to_rgb_array(image: ImageLike) -> np.ndarray:
    """Converts a PIL image, ``HxWx3`` array or ``3xHxW`` tensor to a float ``HxWx3`` array in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert('RGB'), dtype=np.float64) / 255.0
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f'Tensor images must be 3xHxW, got shape {tuple(image.shape)}.')
        tensor = image.detach().cpu()
        array = tensor.permute(1, 2, 0).numpy()
        scale = 255.0 if tensor.dtype == torch.uint8 else 1.0
        return np.clip(array.astype(np.float64) / scale, 0.0, 1.0)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f'Array images must be HxWx3, got shape {image.shape}.')
        if image.dtype == np.uint8:
            return image.astype(np.float64) / 255.0
        # Float arrays are taken to be in [0, 1] already, like tensors.
        return np.clip(image.astype(np.float64), 0.0, 1.0)
    raise ValueError(
        f'Unsupported image type {type(image).__name__}; expected PIL.Image, numpy HxWx3 array or torch 3xHxW tensor.'
    )


def _hue_classes(hue: np.ndarray, colors: tuple[str, ...] = _PALETTE_NAMES) -> np.ndarray:
    """Index (into ``colors``) of the nearest colour by circular hue distance, per pixel."""
    diff = np.abs(hue[..., None] - _color_hues(colors))
    return np.minimum(diff, 360.0 - diff).argmin(axis=-1)


def foreground_mask(image: ImageLike) -> np.ndarray:
    """Boolean ``HxW`` mask of saturated, not-too-dark (i.e. object) pixels.

    Args:
        image: PIL image, uint8 ``HxWx3`` array, or float ``3xHxW`` tensor in ``[0, 1]``.

    Returns:
        The mask of foreground pixels.
    """
    _, saturation, value = _rgb_to_hsv(_to_rgb_array(image))
    return (saturation > SATURATION_THRESHOLD) & (value > VALUE_THRESHOLD)


def _dominant_color_and_mask(
    image: ImageLike, colors: tuple[str, ...] = _PALETTE_NAMES
) -> tuple[str | None, np.ndarray]:
    """Dominant colour (of ``colors``) and the mask of foreground pixels classified as that colour."""
    hue, saturation, value = _rgb_to_hsv(_to_rgb_array(image))
    foreground = (saturation > SATURATION_THRESHOLD) & (value > VALUE_THRESHOLD)
    if foreground.mean() < MIN_FOREGROUND_FRACTION:
        return None, np.zeros_like(foreground)
    classes = _hue_classes(hue, colors)
    votes = np.bincount(classes[foreground], minlength=len(colors))
    winner = int(votes.argmax())
    return colors[winner], foreground & (classes == winner)


def dominant_color(image: ImageLike, colors: Sequence[str] | None = None) -> str | None:
    """The palette colour most of an image's saturated foreground pixels have.

    Foreground pixels (HSV saturation > 0.4, value > 0.25) each vote for the palette colour
    nearest in hue (circular distance); a majority vote tolerates blur, noise and stray pixels
    in generated images.

    Args:
        image: PIL image, uint8 ``HxWx3`` array, or float ``3xHxW`` tensor in ``[0, 1]``.
        colors: The colours to vote among (names of the generator's ``PALETTE`` or ``NEW_COLORS``). Default: the
            palette.

    Returns:
        One of ``colors``, or ``None`` when less than 2% of the pixels are foreground.
    """
    return _dominant_color_and_mask(image, _color_names(colors))[0]


@lru_cache(maxsize=4096)
def _templates(height: int, width: int) -> tuple[tuple[str, np.ndarray], ...]:
    """Ideal shape masks filling an ``height x width`` box (triangles in four orientations)."""
    scale = 4
    h, w = height * scale, width * scale
    outlines: list[tuple[str, str, Any]] = [
        ('circle', 'ellipse', [0, 0, w - 1, h - 1]),
        ('square', 'rectangle', [0, 0, w - 1, h - 1]),
        ('triangle', 'polygon', [(0, h), (w, h), (w / 2, 0)]),
        ('triangle', 'polygon', [(0, 0), (w, 0), (w / 2, h)]),
        ('triangle', 'polygon', [(0, 0), (0, h), (w, h / 2)]),
        ('triangle', 'polygon', [(w, 0), (w, h), (0, h / 2)]),
    ]
    templates = []
    for shape, method, coords in outlines:
        canvas = Image.new('L', (w, h), 0)
        getattr(ImageDraw.Draw(canvas), method)(coords, fill=255)
        coverage = np.asarray(canvas.resize((width, height), Image.Resampling.BOX), dtype=np.float64) / 255.0
        templates.append((shape, coverage))
    return tuple(templates)


def _classify_blob(blob: np.ndarray) -> str:
    """Shape whose template, fitted to the blob's bounding box, best matches the blob.

    Noise in generated images adds stray pixels to an outline, which stretch the tight bounding
    box by a pixel and make a square's corners look empty (i.e. circle-like). So each template is
    also tried in boxes shrunk by one pixel on any side, and the best fit over those boxes counts.
    """
    rows = np.flatnonzero(blob.any(axis=1))
    cols = np.flatnonzero(blob.any(axis=0))
    crop = blob[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.float64)
    height, width = crop.shape
    best_shape, best_error = SHAPES[0], np.inf
    for top, bottom, left, right in itertools.product((0, 1), repeat=4):
        box_h, box_w = height - top - bottom, width - left - right
        if min(box_h, box_w) < 1:
            continue
        for shape, template in _templates(box_h, box_w):
            placed = np.zeros_like(crop)
            placed[top : top + box_h, left : left + box_w] = template
            # Soft templates: an edge pixel half-covered by the ideal shape costs 0.5 either way,
            # so the exact threshold that built the blob matters less.
            error = np.abs(crop - placed).mean()
            if error < best_error:
                best_shape, best_error = shape, error
    return best_shape


def dominant_shape(image: ImageLike) -> str | None:
    """The shape of the largest foreground blob of the dominant colour.

    The blob (largest 4-connected component, holes filled) is compared with ideal circle, square
    and triangle masks stretched to its bounding box (or to that box shrunk by a pixel on any side,
    which shrugs off stray noise pixels); the closest template wins. Comparing whole
    templates (rather than only the bounding-box fill ratio: ~1.0 square, ~0.785 circle, ~0.5
    triangle) also uses *where* the pixels are, which separates rounded squares from circles.

    Args:
        image: PIL image, uint8 ``HxWx3`` array, or float ``3xHxW`` tensor in ``[0, 1]``.

    Returns:
        One of :data:`~diffusion.data.synthetic.SHAPES`, or ``None`` when there is no foreground.
    """
    return _predict(image)[1]


def _shape_of_mask(mask: np.ndarray) -> str | None:
    """Classifies the largest 4-connected component (holes filled) of a foreground mask."""
    labels, num = ndimage.label(ndimage.binary_fill_holes(mask))
    if num == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    return _classify_blob(labels == int(sizes.argmax()) + 1)


def _predict(image: ImageLike, colors: tuple[str, ...] = _PALETTE_NAMES) -> tuple[str | None, str | None]:
    """``(dominant_color, dominant_shape)`` sharing one HSV conversion and segmentation."""
    color, mask = _dominant_color_and_mask(image, colors)
    return color, (None if color is None else _shape_of_mask(mask))


def parse_prompt(prompt: str, colors: Sequence[str] | None = None) -> tuple[str | None, str | None]:
    """The colour (of ``colors``, default the palette) and the (singular) shape a prompt mentions.

    Words are matched whole, so "colored" does not match "red"; plurals map to the singular
    shape. When a prompt names several, the first one wins.

    Args:
        prompt: A caption-like prompt, e.g. "two large blue squares on a noisy beige background".
        colors: The colour words to look for. Default: the palette.

    Returns:
        ``(color, shape)``, each ``None`` when the prompt does not name one.
    """
    names = _color_names(colors)
    color = shape = None
    for word in re.findall(r'[a-z]+', prompt.lower()):
        if color is None and word in names:
            color = word
        if shape is None and word in _SHAPE_WORDS:
            shape = _SHAPE_WORDS[word]
    return color, shape


def _fraction(hits: list[bool]) -> float:
    return float(np.mean(hits)) if hits else float('nan')


def score_prompt_following(
    images: Iterable[ImageLike], prompts: Sequence[str], colors: Sequence[str] | None = None
) -> dict[str, Any]:
    """Scores how often generated images show the colour and shape their prompts ask for.

    Args:
        images: Images (PIL, uint8 ``HxWx3`` arrays, float ``3xHxW`` tensors in ``[0, 1]``, or an
            ``Nx3xHxW`` tensor), one per prompt.
        prompts: The prompts the images were generated from.
        colors: The colours prompts may name and images are classified among (names of the generator's
            ``PALETTE`` and ``NEW_COLORS``; :data:`FINETUNE_COLORS` for the fine-tuning demo). Default: the palette.

    Returns:
        A dict with ``'color'`` (fraction of colour-naming prompts whose image has that dominant
        colour), ``'shape'`` (the same over prompts that name a shape), ``'num_color_prompts'``,
        ``'num_shape_prompts'`` and ``'per_image'``: a list of dicts with ``prompt,
        expected_color, predicted_color, expected_shape, predicted_shape``. A missing prediction
        counts as wrong; a fraction over zero prompts is ``nan``.

    Raises:
        ValueError: If the number of images and prompts differ.
    """
    images = list(images)
    if len(images) != len(prompts):
        raise ValueError(f'Got {len(images)} images but {len(prompts)} prompts; expected one image per prompt.')
    names = _color_names(colors)
    per_image, color_hits, shape_hits = [], [], []
    for image, prompt in zip(images, prompts, strict=True):
        expected_color, expected_shape = parse_prompt(prompt, names)
        predicted_color, predicted_shape = _predict(image, names)
        if expected_color is not None:
            color_hits.append(predicted_color == expected_color)
        if expected_shape is not None:
            shape_hits.append(predicted_shape == expected_shape)
        per_image.append(
            {
                'prompt': prompt,
                'expected_color': expected_color,
                'predicted_color': predicted_color,
                'expected_shape': expected_shape,
                'predicted_shape': predicted_shape,
            }
        )
    return {
        'color': _fraction(color_hits),
        'shape': _fraction(shape_hits),
        'num_color_prompts': len(color_hits),
        'num_shape_prompts': len(shape_hits),
        'per_image': per_image,
    }


def load_prompts(path: str | os.PathLike = DEMO_PROMPTS_PATH) -> list[str]:
    """Reads one prompt per line, skipping blank lines and ``#`` comments.

    Args:
        path: Text file of prompts; defaults to the packaged demo prompts.

    Returns:
        The prompts, stripped of surrounding whitespace.
    """
    with open(path, encoding='utf-8') as f:
        lines = (line.strip() for line in f)
        return [line for line in lines if line and not line.startswith('#')]
