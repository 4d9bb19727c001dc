"""Command line of the data pipeline: ``python -m diffusion.pipeline <stage> ...``.

Stages: ``ingest`` (raw inputs -> MDS), ``filter``, ``caption``, ``report``, and ``precompute`` (image-caption
shards -> latent shards for training without the encoders). Every stage but ``report`` runs on
any number of ranks under the composer launcher or torchrun, e.g.
``composer -n 8 -m diffusion.pipeline caption --input s3://bucket/filtered --out s3://bucket/captioned``,
or on a Ray cluster with ``--engine ray [--address auto] [--workers N] [--num-gpus G]``; the output is the same.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from diffusion.data.licenses import LICENSE_PRESETS
from diffusion.pipeline.engines import ENGINES
from diffusion.pipeline.filtering import FilterOptions, filter_dataset
from diffusion.pipeline.ingest import IngestOptions, ingest
from diffusion.pipeline.report import report_outputs
from diffusion.pipeline.runner import StageRunner, rank_info
from diffusion.pipeline.sources import SOURCES


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--out', required=True, help='Output folder or object-store URL (s3://bucket/path).')
    parser.add_argument('--overwrite', action='store_true', help='Discard an earlier run in --out instead of resuming.')
    parser.add_argument('--compression', default=None, help='MDS shard compression, e.g. zstd. Default: none.')
    parser.add_argument('--size-limit', default='64mb', help='MDS shard size limit. Default: 64mb.')
    parser.add_argument('--no-progress', action='store_true', help='Hide the progress bars.')
    parser.add_argument(
        '--engine', choices=ENGINES, default='ranks', help='ranks (this process is a launcher rank) or ray.'
    )
    parser.add_argument('--address', default=None, help='Ray cluster address (auto: the running one). Default: local.')
    parser.add_argument('--workers', type=int, default=None, help='Ray actors/tasks at once. Default: one per CPU/GPU.')


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m diffusion.pipeline', description=__doc__.split('\n')[0])
    stages = parser.add_subparsers(dest='stage', required=True)

    ingest_parser = stages.add_parser('ingest', help='Read raw images with metadata and write validated MDS shards.')
    ingest_parser.add_argument('--source', choices=SOURCES, required=True)
    ingest_parser.add_argument(
        '--input', nargs='+', required=True, help='Parquet/tar files, folders or globs; the metadata file for folder.'
    )
    ingest_parser.add_argument('--image-root', default=None, help='folder source: images are relative to this.')
    ingest_parser.add_argument('--unit-size', type=int, default=1000, help='Rows per unit of work. Default: 1000.')
    ingest_parser.add_argument('--max-side', type=int, default=1024, help='Longest stored side. Default: 1024.')
    ingest_parser.add_argument('--image-format', choices=('jpeg', 'png', 'webp'), default='jpeg')
    ingest_parser.add_argument('--quality', type=int, default=95)
    ingest_parser.add_argument('--max-pixels', type=int, default=1 << 28, help='Larger images are bombs.')
    _add_output_arguments(ingest_parser)

    filter_parser = stages.add_parser('filter', help='Keep allowed licenses and sizes; drop duplicates.')
    filter_parser.add_argument('--input', required=True, help='Output of the ingest stage.')
    filter_parser.add_argument('--preset', choices=sorted(LICENSE_PRESETS), default='commercial')
    filter_parser.add_argument('--min-side', type=int, default=512)
    filter_parser.add_argument('--min-aspect', type=float, default=None, help='Minimum width/height.')
    filter_parser.add_argument('--max-aspect', type=float, default=None, help='Maximum width/height.')
    filter_parser.add_argument('--keep-exact-duplicates', action='store_true')
    filter_parser.add_argument(
        '--near-duplicate-distance', type=int, default=4, help='Perceptual-hash bits; -1 turns the check off.'
    )
    _add_output_arguments(filter_parser)

    caption_parser = stages.add_parser('caption', help='Write synthetic captions with an image-captioning model.')
    caption_parser.add_argument('--input', required=True, help='Output of the ingest or filter stage.')
    caption_parser.add_argument('--captioner', default='blip2', help='Registered captioner name. Default: blip2.')
    caption_parser.add_argument(
        '--model', default='Salesforce/blip2-opt-2.7b', help='Local folder or hub id of the captioning model.'
    )
    caption_parser.add_argument('--batch-size', type=int, default=16)
    caption_parser.add_argument('--max-new-tokens', type=int, default=30)
    caption_parser.add_argument('--num-beams', type=int, default=1, help='1 is greedy decoding.')
    caption_parser.add_argument('--dtype', default=None, help='float32, float16 or bfloat16 (default by device).')
    caption_parser.add_argument(
        '--num-gpus', type=float, default=None, help='GPUs per Ray actor. Default: 1 if the cluster has GPUs.'
    )
    _add_output_arguments(caption_parser)

    precompute_parser = stages.add_parser('precompute', help='Encode images and captions once: latent shards.')
    precompute_parser.add_argument('--input', required=True, help='Image-caption dataset (folder or s3://...).')
    precompute_parser.add_argument('--config', required=True, help='Training yaml whose model section is encoded with.')
    precompute_parser.add_argument('--override', nargs='*', default=[], help='Config overrides, e.g. model.name=x.')
    precompute_parser.add_argument(
        '--resolution', type=int, default=None, help="Default: the config's train_dataloader.resolution."
    )
    precompute_parser.add_argument('--store', choices=('moments', 'sample'), default='moments')
    precompute_parser.add_argument('--latents-dtype', choices=('float16', 'bfloat16', 'float32'), default='float16')
    precompute_parser.add_argument('--encode-dtype', choices=('float32', 'bfloat16'), default='float32')
    precompute_parser.add_argument('--caption-column', default='caption')
    precompute_parser.add_argument('--batch-size', type=int, default=32)
    precompute_parser.add_argument('--seed', type=int, default=0, help='Seed of the draws with --store sample.')
    precompute_parser.add_argument(
        '--num-gpus', type=float, default=None, help='GPUs per Ray actor. Default: 1 if the cluster has GPUs.'
    )
    _add_output_arguments(precompute_parser)

    report_parser = stages.add_parser('report', help='Provenance report of stage outputs, in pipeline order.')
    report_parser.add_argument('stage_outputs', nargs='+', help='The output folders of the stages, in order.')
    report_parser.add_argument('--out', required=True, help='Local folder for the report files.')
    report_parser.add_argument('--title', default='Provenance report')
    return parser


def _runner_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        overwrite=args.overwrite,
        compression=args.compression,
        size_limit=args.size_limit,
        progress=not args.no_progress,
        engine=args.engine,
        address=args.address,
        workers=args.workers,
    )


def _summary(runner: StageRunner, num_units: int) -> None:
    kept = 0
    dropped: dict[str, int] = {}
    for s in runner.unit_stats(list(range(num_units))):  # one unit at a time: the stats list every dropped sample
        kept += sum(s['kept'].values())
        for reason, by_license in s['dropped'].items():
            dropped[reason] = dropped.get(reason, 0) + sum(by_license.values())
    print(f'{runner.stage}: kept {kept}, dropped {sum(dropped.values())} {json.dumps(dropped, sort_keys=True)}')


def _config_resolution(config: str, overrides: Sequence[str]) -> int:
    from diffusion.config import load_config  # Hydra: only the precompute stage reads a training config

    resolution = load_config(config, list(overrides)).get('train_dataloader', {}).get('resolution')
    if resolution is None:
        raise ValueError(f'{config} has no train_dataloader.resolution; pass --resolution.')
    return int(resolution)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = _build_parser().parse_args(argv)
    if args.stage == 'report':
        report = report_outputs(args.stage_outputs, args.out, title=args.title)
        print(f'report: {report["final"]["images"]} images, written to {args.out}/provenance.md')
        return
    if args.stage == 'ingest':
        options = IngestOptions(
            max_side=args.max_side, image_format=args.image_format, quality=args.quality, max_pixels=args.max_pixels
        )
        runner = ingest(
            args.source,
            args.input,
            args.out,
            options=options,
            unit_size=args.unit_size,
            image_root=args.image_root,
            **_runner_kwargs(args),
        )
    elif args.stage == 'filter':
        options = FilterOptions(
            preset=args.preset,
            min_side=args.min_side,
            min_aspect=args.min_aspect,
            max_aspect=args.max_aspect,
            exact_duplicates=not args.keep_exact_duplicates,
            near_duplicate_distance=None if args.near_duplicate_distance < 0 else args.near_duplicate_distance,
        )
        runner = filter_dataset(args.input, args.out, options=options, **_runner_kwargs(args))
    elif args.stage == 'precompute':
        # Imported here: the model stack (diffusers, the registries) takes seconds and only this stage needs it.
        from diffusion.pipeline.precompute import PrecomputeOptions, precompute_latents

        resolution = args.resolution or _config_resolution(args.config, args.override)
        options = PrecomputeOptions(
            resolution=resolution,
            store=args.store,
            latents_dtype=args.latents_dtype,
            encode_dtype=args.encode_dtype,
            caption_column=args.caption_column,
            batch_size=args.batch_size,
            seed=args.seed,
        )
        runner = precompute_latents(
            args.input,
            args.out,
            config=args.config,
            overrides=args.override,
            options=options,
            num_gpus=args.num_gpus,
            **_runner_kwargs(args),
        )
    else:
        # Imported here: transformers' BLIP-2 takes seconds to import and only this stage needs it.
        from diffusion.pipeline.captioning import caption_dataset

        captioner_kwargs = dict(
            model_name_or_path=args.model,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            num_beams=args.num_beams,
            dtype=args.dtype,
        )
        runner = caption_dataset(
            args.input,
            args.out,
            captioner=args.captioner,
            captioner_kwargs=captioner_kwargs,
            num_gpus=args.num_gpus,
            **_runner_kwargs(args),
        )
    if rank_info().rank == 0:
        _summary(runner, runner.num_units)


def cli() -> None:
    """``main`` for the shell: a user mistake (bad path, column, setting) prints one line, not a traceback."""
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, PermissionError) as error:
        print(f'python -m diffusion.pipeline: error: {error}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    cli()
