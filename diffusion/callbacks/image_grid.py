"""Writing batches of generated images as one PNG grid (built on torchvision's ``make_grid``/``save_image``)."""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
from torchvision.utils import save_image

__all__ = ['save_image_grid']


def save_image_grid(images: torch.Tensor, path: str, nrow: Optional[int] = None, padding: int = 2) -> str:
    """Save images (N, 3, H, W) in [0, 1] as one PNG grid at ``path``, written atomically; returns ``path``."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    nrow = nrow or math.ceil(math.sqrt(images.shape[0]))
    tmp = f'{path}.tmp.png'
    save_image(images.detach().float().cpu().clamp(0, 1), tmp, nrow=nrow, padding=padding)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated PNG behind
    return path
