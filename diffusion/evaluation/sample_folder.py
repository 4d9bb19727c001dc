"""The layout of a folder of samples, shared by the sampling CLI, the metrics, their callback and the human study.

``python -m diffusion.inference.sample`` writes one PNG per (prompt, seed) named ``{prompt_index:05d}_{seed}.png``,
a ``samples.jsonl`` index with one JSON row per image (``file``, ``prompt_index``, ``prompt``, ``seed`` and the
settings that drew it) and a ``contact_sheet.png`` grid, which is not a sample; each PNG is written as
``<name>.tmp.png`` and renamed, so a killed run can leave one of those, which is not a sample either
(:func:`is_sample_image`). The ``image_metrics`` callback saves
its images in the same layout, so that the metrics command and the human study read either. Standard library only:
the human study's web app imports it without torch.
"""

from __future__ import annotations

import json
import os
import re

__all__ = [
    'CONTACT_SHEET',
    'PARTIAL_SUFFIX',
    'SAMPLES_FILE',
    'SAMPLE_NAME',
    'image_filename',
    'is_sample_image',
    'read_samples_file',
]

SAMPLES_FILE = 'samples.jsonl'
CONTACT_SHEET = 'contact_sheet.png'
# What the sampling command and the contact sheet write before renaming an image into place.
PARTIAL_SUFFIX = '.tmp.png'
# ``{prompt_index:05d}_{seed}.png`` (seeds may be negative): prompt index and seed from a file name.
SAMPLE_NAME = re.compile(r'^(\d+)_(-?\d+)\.[A-Za-z]+$')


def image_filename(prompt_index: int, seed: int) -> str:
    """``{prompt_index:05d}_{seed}.png``."""
    return f'{prompt_index:05d}_{seed}.png'


def is_sample_image(path: str) -> bool:
    """Whether an image file (a name or a path, in any folder) can be a sample, i.e. is not one of the layout's own
    other images: the contact sheet, or an image write that was cut short. Reference and generated image folders
    alike are read without them: a sample folder's contact sheet once counted as a 73rd reference image."""
    name = os.path.basename(path)
    return name != CONTACT_SHEET and not name.endswith(PARTIAL_SUFFIX)


def read_samples_file(path: str) -> list[dict]:
    """The rows of a ``samples.jsonl`` in file order, blank lines skipped.

    Raises:
        ValueError: Naming the file and line of a row that is not valid JSON or not an object with a ``file`` key.
    """
    rows = []
    with open(path, encoding='utf-8') as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f'{path}, line {line_number}: not valid JSON ({error}).') from error
            if not isinstance(row, dict) or 'file' not in row:
                raise ValueError(f'{path}, line {line_number}: expected an object with a "file" key, got {row!r}.')
            rows.append(row)
    return rows
