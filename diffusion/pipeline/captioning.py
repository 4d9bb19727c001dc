"""Caption stage: synthetic captions from a pretrained captioner ("telephoning" in the CommonCanvas paper).

Reads a dataset written by the pipeline one shard (unit) at a time, captions its images with a
:class:`~diffusion.pipeline.captioners.Captioner` (BLIP-2 by default) and writes the same samples with ``caption``
replaced by the synthetic one; the alt text that came with the image stays in ``original_caption``, so which one
trains stays a dataset option. On GPUs each rank uses ``cuda:<LOCAL_RANK>``.
"""

from __future__ import annotations

import io
from typing import Any, Iterator, Optional

import torch
from PIL import Image

from diffusion.pipeline.captioners import Captioner, build_captioner
from diffusion.pipeline.runner import Drop, StageRunner, rank_info
from diffusion.pipeline.shards import MDS_COLUMNS, InputDataset, require_input

__all__ = ['caption_dataset', 'caption_samples']


def caption_samples(
    samples: Iterator[dict[str, Any]], captioner: Captioner, chunk_size: int = 64
) -> Iterator[dict[str, Any] | Drop]:
    """Yield ``samples`` with ``caption`` set by ``captioner``, ``chunk_size`` images per call, in order."""
    chunk: list[tuple[dict[str, Any], Image.Image]] = []

    def flush() -> Iterator[dict[str, Any]]:
        captions = captioner.caption([image for _, image in chunk])
        for (sample, _), caption in zip(chunk, captions, strict=True):
            yield {**sample, 'caption': caption}
        chunk.clear()

    for sample in samples:
        try:
            with Image.open(io.BytesIO(sample['image'])) as image:
                chunk.append((sample, image.convert('RGB')))
        except OSError as error:
            yield Drop('undecodable', sample['key'], sample['key'], sample['license'], str(error))
            continue
        if len(chunk) == chunk_size:
            yield from flush()
    if chunk:
        yield from flush()


def caption_dataset(
    input_root: str,
    out: str,
    *,
    captioner: str = 'blip2',
    captioner_kwargs: Optional[dict[str, Any]] = None,
    chunk_size: int = 64,
    **runner_kwargs: Any,
) -> StageRunner:
    """Run the caption stage from ``input_root`` into ``out`` with the captioner registered as ``captioner``."""
    captioner_kwargs = dict(captioner_kwargs or {})
    require_input(input_root)
    runner = StageRunner(
        'caption', out, {'input': input_root, 'captioner': captioner, **captioner_kwargs}, **runner_kwargs
    )
    dataset = InputDataset(input_root, runner.scratch)
    if dataset.shards:
        missing = sorted(set(MDS_COLUMNS) - set(dataset.shards[0]['column_names']))
        if missing:
            raise ValueError(f'{input_root} lacks the columns {missing}; caption the output of the ingest stage.')
    if torch.cuda.is_available():
        captioner_kwargs.setdefault('device', f'cuda:{rank_info().local_rank}')
    model = build_captioner(captioner, **captioner_kwargs)
    runner.run(
        len(dataset),
        lambda unit: caption_samples(dataset.iter_shard(unit), model, chunk_size),
        unit_samples=[shard['samples'] for shard in dataset.shards],
    )
    return runner
