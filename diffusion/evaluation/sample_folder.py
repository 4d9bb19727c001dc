"""The layout of a folder of samples, shared by the sampling CLI, the metrics, their callback and the human study.

``python -m diffusion.inference.sample`` writes one PNG per (prompt, seed) named ``{prompt_index:05d}_{seed}.png``,
a ``samples.jsonl`` index with one JSON row per image (``file``, ``prompt_index``, ``prompt``, ``seed`` and the
settings that drew it) and a ``contact_sheet.png`` grid, which is not a sample. The ``image_metrics`` callback saves
its images in the same layout, so that the metrics command and the human study read either. Standard library only:
the human study's web app imports it without torch.
"""

from __future__ import annotations

import re

__all__ = ['CONTACT_SHEET', 'SAMPLES_FILE', 'SAMPLE_NAME', 'image_filename']

SAMPLES_FILE = 'samples.jsonl'
CONTACT_SHEET = 'contact_sheet.png'
# ``{prompt_index:05d}_{seed}.png`` (seeds may be negative): prompt index and seed from a file name.
SAMPLE_NAME = re.compile(r'^(\d+)_(-?\d+)\.[A-Za-z]+$')


def image_filename(prompt_index: int, seed: int) -> str:
    """``{prompt_index:05d}_{seed}.png``."""
    return f'{prompt_index:05d}_{seed}.png'
