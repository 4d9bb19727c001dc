"""Prompt sets for sampling and evaluation: plain text, PartiPrompts, DrawBench and COCO captions.

The layout of a file is read from its extension and header, so a downloaded benchmark file works as is:

* plain text (``.txt`` or no extension): one prompt per line; blank lines and ``#`` comments are skipped;
* PartiPrompts (``PartiPrompts.tsv``): tab-separated columns ``Prompt``, ``Category``, ``Challenge``, ``Note``;
* DrawBench (tsv or csv export of the sheet): columns ``Prompts``, ``Category``;
* COCO captions (``captions_val2014.json`` and the like): the ``images`` and ``annotations`` lists; each image gives
  one prompt (its first caption) and its reference image file, which FID and KID compare against.

Built on the standard library's ``csv`` and ``json`` readers. ``'demo'`` names the prompt list of the demo
(:data:`diffusion.evaluation.prompt_following.DEMO_PROMPTS_PATH`), which ships with the package.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import Optional

from diffusion.evaluation.prompt_following import DEMO_PROMPTS_PATH

__all__ = ['BUILTIN_PROMPT_SETS', 'PromptRecord', 'load_prompt_records', 'load_prompt_set']

BUILTIN_PROMPT_SETS = {'demo': DEMO_PROMPTS_PATH}

# Header column holding the prompt, per table layout; both layouts name their category column 'Category'.
TABLE_LAYOUTS = {'PartiPrompts': 'Prompt', 'DrawBench': 'Prompts'}
CATEGORY_COLUMN = 'Category'
ACCEPTED_LAYOUTS = (
    'plain text (.txt, one prompt per line), PartiPrompts tsv (columns Prompt, Category, Challenge, Note), '
    'DrawBench tsv/csv (columns Prompts, Category), COCO captions json (keys images, annotations); '
    'or a tsv/csv with column=NAME naming the prompt column'
)


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """One prompt of a prompt set.

    Args:
        prompt (str): The text prompt.
        category (str, optional): Its category (PartiPrompts, DrawBench), if the set has one.
        reference (str, optional): File name of its reference image (COCO captions), relative to the image folder.
    """

    prompt: str
    category: Optional[str] = None
    reference: Optional[str] = None


def _resolve(path: str) -> str:
    if path in BUILTIN_PROMPT_SETS:
        return BUILTIN_PROMPT_SETS[path]
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f'Prompt set {path!r} is neither a file nor a built-in name. Built-in names: '
            f'{", ".join(sorted(BUILTIN_PROMPT_SETS))}.'
        )
    return path


def _read_text(path: str) -> list[PromptRecord]:
    with open(path, encoding='utf-8-sig') as f:
        lines = (line.strip() for line in f)
        return [PromptRecord(line) for line in lines if line and not line.startswith('#')]


def _read_table(path: str, column: Optional[str]) -> list[PromptRecord]:
    with open(path, encoding='utf-8-sig', newline='') as f:
        delimiter = '\t' if path.lower().endswith('.tsv') else ','
        reader = csv.DictReader(f, delimiter=delimiter)
        header = [name.strip() for name in reader.fieldnames or []]
        reader.fieldnames = header
        if column is None:
            column = next((name for name in TABLE_LAYOUTS.values() if name in header), None)
            if column is None:
                raise ValueError(
                    f'{path}: unknown prompt-file layout (header columns: {", ".join(header) or "none"}). '
                    f'Accepted layouts: {ACCEPTED_LAYOUTS}.'
                )
        elif column not in header:
            raise ValueError(f'{path}: no column {column!r}. Columns: {", ".join(header)}.')
        records = []
        for row in reader:
            prompt = (row.get(column) or '').strip()
            if prompt:
                category = (row.get(CATEGORY_COLUMN) or '').strip() or None
                records.append(PromptRecord(prompt, category=category))
        return records


def _read_coco(path: str) -> list[PromptRecord]:
    with open(path, encoding='utf-8') as f:
        data = json.load(f)
    if not isinstance(data, dict) or not {'images', 'annotations'} <= set(data):
        raise ValueError(f'{path}: a json prompt set must be COCO captions (keys images, annotations).')
    file_names = {image['id']: image['file_name'] for image in data['images']}
    first_caption: dict[int, tuple[int, str]] = {}
    for annotation in data['annotations']:
        image_id, caption = annotation['image_id'], annotation['caption'].strip()
        if image_id not in file_names:
            raise ValueError(f'{path}: annotation {annotation.get("id")} names image {image_id}, not in images.')
        # The lowest annotation id per image: the same caption whatever the order of the file.
        key = (annotation.get('id', 0), caption)
        if caption and (image_id not in first_caption or key < first_caption[image_id]):
            first_caption[image_id] = key
    return [
        PromptRecord(first_caption[image_id][1], reference=file_names[image_id]) for image_id in sorted(first_caption)
    ]


def load_prompt_records(
    path: str, column: Optional[str] = None, category: Optional[str] = None, limit: Optional[int] = None
) -> list[PromptRecord]:
    """Reads a prompt set as :class:`PromptRecord` s (prompt, category, reference image).

    Args:
        path (str): A prompt file (see the module docstring for the layouts) or a built-in name (``'demo'``).
        column (str, optional): The column holding the prompts, for a tsv/csv of another layout.
        category (str, optional): Keep only this category (case-insensitive); needs a set with categories.
        limit (int, optional): Keep the first ``limit`` prompts (after the category filter).

    Returns:
        list[PromptRecord]: The prompts in file order (COCO: by image id, one caption per image).

    Raises:
        FileNotFoundError: If ``path`` is neither a file nor a built-in name.
        ValueError: For an unknown layout, a missing column or category, or an empty result.
    """
    path = _resolve(path)
    extension = os.path.splitext(path)[1].lower()
    if extension in ('.tsv', '.csv'):
        records = _read_table(path, column)
    elif column is not None:
        raise ValueError(f'{path}: column={column!r} applies to tsv/csv prompt files only.')
    elif extension == '.json':
        records = _read_coco(path)
    elif extension in ('.txt', ''):
        records = _read_text(path)
    else:
        raise ValueError(f'{path}: unknown prompt-file layout {extension!r}. Accepted layouts: {ACCEPTED_LAYOUTS}.')
    if category is not None:
        categories = sorted({record.category for record in records if record.category is not None})
        if not categories:
            raise ValueError(f'{path}: category={category!r} given, but this prompt set has no categories.')
        records = [r for r in records if r.category is not None and r.category.lower() == category.lower()]
        if not records:
            raise ValueError(f'{path}: no prompts in category {category!r}. Categories: {", ".join(categories)}.')
    if limit is not None:
        if limit < 1:
            raise ValueError(f'limit must be a positive number of prompts, got {limit}.')
        records = records[:limit]
    if not records:
        raise ValueError(f'{path}: no prompts found.')
    return records


def load_prompt_set(
    path: str, column: Optional[str] = None, category: Optional[str] = None, limit: Optional[int] = None
) -> list[str]:
    """The prompts of a prompt set, as strings; arguments as :func:`load_prompt_records`."""
    return [record.prompt for record in load_prompt_records(path, column=column, category=category, limit=limit)]
