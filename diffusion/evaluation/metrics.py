"""Command line for the automatic image metrics: FID and KID against reference images, CLIP score against prompts.

``python -m diffusion.evaluation.metrics --images FOLDER ...`` scores a folder of generated images (the sampling
command's layout, or just images); with ``--checkpoint`` it first samples the prompts from that checkpoint into the
folder. The metrics are :mod:`diffusion.evaluation.image_metrics`, which the training callback uses too; this module
is a command-line entry point, at the top layer with the sampling and export commands it calls.

COCO-style evaluation (the usual FID-30k recipe): sample one image per caption of COCO's
``captions_val2014.json`` and compare with the captioned images::

    python -m diffusion.evaluation.metrics --checkpoint run/checkpoints/latest-rank0.pt \\
        --prompts annotations/captions_val2014.json --limit 30000 --reference val2014/ \\
        --images samples/coco30k --resolution 256 --fid --kid --clip-score \\
        --inception-weights weights/weights-inception-2015-12-05-6726825d.safetensors \\
        --clip-model weights/clip-vit-large-patch14

InceptionV3's weights are read only as safetensors, converted once from torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth`` (its release URL, :data:`~diffusion.evaluation.image_metrics.
INCEPTION_URL`): ``python -m diffusion.evaluation.image_metrics convert-inception --download OUT.safetensors``, or
offline ``... convert-inception weights-inception-2015-12-05-6726825d.pth OUT.safetensors`` on a copy of that file.

Each COCO image contributes its first caption as a prompt and itself as a reference image. Caveat: FID is biased
upwards on few images (the covariance estimate is noisy), so values are comparable only at the same image count;
``num_images`` and ``num_reference`` are reported next to FID. Use thousands of images for a number worth quoting.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, Optional

import torch

from diffusion.evaluation.image_metrics import (
    CONVERT_INCEPTION_COMMAND,
    INCEPTION_SAFETENSORS,
    METRIC_NAMES,
    GenerationMetrics,
    evaluate_folder,
)
from diffusion.evaluation.prompts import load_prompt_records
from diffusion.inference.loading import load_model
from diffusion.inference.sample import sample_to_folder

__all__ = ['format_table', 'main']


def format_table(result: dict[str, Any]) -> str:
    """A two-column text table of the metric values and image counts."""
    lines = [f'{"metric":<12} {"value":>14}']
    for name in ('fid', 'kid_mean', 'kid_std', 'clip_score', 'num_images', 'num_reference'):
        if name in result:
            value = result[name]
            lines.append(f'{name:<12} {value:>14.6f}' if isinstance(value, float) else f'{name:<12} {value:>14}')
    return '\n'.join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m diffusion.evaluation.metrics',
        description='FID, KID and CLIP score of a folder of generated images (or of a checkpoint, sampled first).',
    )
    parser.add_argument('--images', required=True, help='Folder of generated images; with --checkpoint, written.')
    parser.add_argument('--reference', help='Reference images for FID/KID: a folder, or a local MDS dataset.')
    parser.add_argument('--reference-column', default='image', help='Image column of an MDS reference.')
    parser.add_argument('--num-reference', type=int, help='Use the first NUM_REFERENCE reference images.')
    parser.add_argument('--prompts', help='Prompt set (txt, PartiPrompts/DrawBench tsv, COCO captions json, demo).')
    parser.add_argument('--prompt-column', help='Column holding the prompts, for another tsv/csv layout.')
    parser.add_argument('--category', help='Keep only the prompts of this category.')
    parser.add_argument('--limit', type=int, help='Keep the first LIMIT prompts.')
    parser.add_argument('--fid', action='store_true', help='Frechet Inception Distance.')
    parser.add_argument('--kid', action='store_true', help='Kernel Inception Distance (mean and std over subsets).')
    parser.add_argument('--clip-score', action='store_true', help='CLIP score of the images against their prompts.')
    parser.add_argument(
        '--inception-weights',
        help=f'InceptionV3 weights as safetensors ({INCEPTION_SAFETENSORS}), made once by {CONVERT_INCEPTION_COMMAND}.',
    )
    parser.add_argument('--feature-extractor', help='TorchScript FID/KID feature extractor (instead of Inception).')
    parser.add_argument('--clip-model', help='Folder with a CLIPModel and its CLIPProcessor.')
    parser.add_argument('--kid-subsets', type=int, default=100)
    parser.add_argument('--kid-subset-size', type=int, default=1000)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--resolution', type=int, help='Resize and centre-crop all images (and samples) to this.')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--out', help='Write the results to this JSON file.')
    sampling = parser.add_argument_group('sampling (with --checkpoint)')
    sampling.add_argument('--checkpoint', help='Sample --prompts from this checkpoint into --images first.')
    sampling.add_argument('--config', help='Training yaml of the checkpoint, if it does not hold its config.')
    sampling.add_argument('--no-ema', action='store_true', help='Sample with the raw weights, not the EMA ones.')
    sampling.add_argument('--seed', type=int, default=0)
    sampling.add_argument('--guidance-scale', type=float, default=7.5)
    sampling.add_argument('--num-inference-steps', type=int, default=50)
    sampling.add_argument('--scheduler', help="Sampler name; default: the model's.")
    return parser


def _sample_checkpoint(args: argparse.Namespace, prompts: list[str]) -> None:
    model = load_model(args.checkpoint, config=args.config, use_ema=not args.no_ema, device=args.device)
    sample_to_folder(
        model,
        prompts,
        args.images,
        seeds=(args.seed,),
        seed_per_prompt=True,  # seed + prompt index, as the image_metrics callback draws them
        batch_size=args.batch_size,
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.num_inference_steps,
        height=args.resolution,
        width=args.resolution,
        scheduler=args.scheduler,
    )


def main(argv: Optional[Sequence[str]] = None) -> dict[str, float]:
    """The command line: parse, (sample,) evaluate, print a table, write JSON; returns the results."""
    args = _parser().parse_args(argv)
    names = [name for name in METRIC_NAMES if getattr(args, name)]
    if not names:  # every metric whose inputs were given
        has_extractor = args.inception_weights or args.feature_extractor
        names = (['fid', 'kid'] if args.reference and has_extractor else []) + (['clip_score'] * bool(args.clip_model))
        if not names:
            _parser().error('no metric to compute: give --fid/--kid with --reference, or --clip-score --clip-model.')
    records = None
    if args.prompts:
        records = load_prompt_records(args.prompts, column=args.prompt_column, category=args.category, limit=args.limit)
    if args.checkpoint:
        if records is None:
            _parser().error('--checkpoint needs --prompts to sample.')
        _sample_checkpoint(args, [record.prompt for record in records])
    metrics = GenerationMetrics(
        names,
        feature_extractor=args.feature_extractor,
        inception_weights=args.inception_weights,
        clip_model=args.clip_model,
        kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size,
    ).to(args.device)
    references = [record.reference for record in records or [] if record.reference is not None] or None
    result = evaluate_folder(
        metrics,
        args.images,
        reference=args.reference,
        prompts=None if records is None else [record.prompt for record in records],
        reference_files=references,
        reference_column=args.reference_column,
        num_reference=args.num_reference,
        resolution=args.resolution,
        batch_size=args.batch_size,
    )
    print(format_table(result))
    if args.out:
        report = {**result, 'images': args.images, 'reference': args.reference, 'resolution': args.resolution}
        folder = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(folder, exist_ok=True)
        with open(args.out, 'w') as f:
            json.dump(report, f, indent=2)
    return result


if __name__ == '__main__':
    main(sys.argv[1:])
