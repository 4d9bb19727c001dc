"""Caption stage: synthetic captions from a pretrained captioner ("telephoning" in the CommonCanvas paper).

Reads a dataset written by the pipeline one shard (unit) at a time, captions its images with a
:class:`~diffusion.pipeline.captioners.Captioner` (BLIP-2 by default) and writes the same samples with ``caption``
replaced by the synthetic one; the alt text that came with the image stays in ``original_caption``, so which one
trains stays a dataset option. On GPUs each rank uses ``cuda:<LOCAL_RANK>``.

The unit's work is two halves (:class:`~diffusion.pipeline.engines.UnitWork`): :func:`decode_samples` (CPU: JPEG
decoding) and :func:`caption_decoded` (the model). The ranks engine runs both in one process; the Ray engine runs the
decode as CPU tasks feeding an actor pool, ``num_gpus`` per actor, that holds the captioner.
"""

from __future__ import annotations

import io
from typing import Any, Iterable, Iterator, Optional

import torch
from PIL import Image

from diffusion.pipeline.captioners import Captioner, build_captioner
from diffusion.pipeline.engines import UnitWork
from diffusion.pipeline.runner import Drop, StageRunner, rank_info
from diffusion.pipeline.shards import MDS_COLUMNS, InputDataset, require_input

__all__ = ['caption_dataset', 'caption_decoded', 'caption_samples', 'decode_samples']


def decode_samples(samples: Iterable[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], Image.Image] | Drop]:
    """Each sample with its decoded RGB image, or the ``undecodable`` drop; the CPU half of a unit (a generator:
    the ranks engine streams it, the Ray engine materialises a unit in its decode task)."""
    for sample in samples:
        try:
            with Image.open(io.BytesIO(sample['image'])) as image:
                decoded = (sample, image.convert('RGB'))
        except OSError as error:
            yield Drop('undecodable', sample['key'], sample['key'], sample['license'], str(error))
            continue
        yield decoded


def caption_decoded(
    decoded: Iterable[tuple[dict[str, Any], Image.Image] | Drop], captioner: Captioner, chunk_size: int = 64
) -> Iterator[dict[str, Any] | Drop]:
    """Yield the decoded samples with ``caption`` set by ``captioner``, ``chunk_size`` images per call, in order."""
    chunk: list[tuple[dict[str, Any], Image.Image]] = []

    def flush() -> Iterator[dict[str, Any]]:
        captions = captioner.caption([image for _, image in chunk])
        for (sample, _), caption in zip(chunk, captions, strict=True):
            yield {**sample, 'caption': caption}
        chunk.clear()

    for item in decoded:
        if isinstance(item, Drop):
            yield item
            continue
        chunk.append(item)
        if len(chunk) == chunk_size:
            yield from flush()
    if chunk:
        yield from flush()


def caption_samples(
    samples: Iterable[dict[str, Any]], captioner: Captioner, chunk_size: int = 64
) -> Iterator[dict[str, Any] | Drop]:
    """Yield ``samples`` with ``caption`` set by ``captioner``, ``chunk_size`` images per call, in order."""
    return caption_decoded(decode_samples(samples), captioner, chunk_size)


def caption_dataset(
    input_root: str,
    out: str,
    *,
    captioner: str = 'blip2',
    captioner_kwargs: Optional[dict[str, Any]] = None,
    chunk_size: int = 64,
    num_gpus: Optional[float] = None,
    **runner_kwargs: Any,
) -> StageRunner:
    """Run the caption stage from ``input_root`` into ``out`` with the captioner registered as ``captioner``.

    ``num_gpus`` is what each Ray actor asks for (default: 1 when the Ray cluster has GPUs, else 0).
    """
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

    def build():
        kwargs = dict(captioner_kwargs)
        if torch.cuda.is_available():  # a Ray actor sees only its own GPUs, and LOCAL_RANK is 0 there
            kwargs.setdefault('device', f'cuda:{rank_info().local_rank}')
        model = build_captioner(captioner, **kwargs)
        return lambda unit, decoded: caption_decoded(decoded, model, chunk_size)

    work = UnitWork(
        build=build,
        decode=lambda unit: decode_samples(dataset.iter_shard(unit)),
        num_gpus=num_gpus,
    )
    runner.run(len(dataset), work, unit_samples=[shard['samples'] for shard in dataset.shards])
    return runner
