"""The fine-tuning demo's report (``make demo-finetune``): a new concept learnt, the old colours kept, per method.

For the base model (the ``make demo`` model exported as a diffusers folder) and each fine-tuning run (a LoRA run,
a full fine-tuning run) it samples the new-concept prompts (:data:`~diffusion.evaluation.prompt_following.
FINETUNE_PROMPTS_PATH`) and the demo's prompts of the eight old colours, with the demo's seeds, guidance and
sampler steps, and scores them with the deterministic checker voting among the old colours and the new one
(:data:`~diffusion.evaluation.prompt_following.FINETUNE_COLORS`): an old-colour image drawn in the new colour counts
as wrong. Per run it adds the trainable parameters, the checkpoint's size (a LoRA run's holds its adapters alone,
:mod:`diffusion.callbacks.frozen_base`), the training minutes (Composer's ``SpeedMonitor``: ``time/train``, which
the fine-tuning yamls log in seconds, read from the run's file log) and the forgetting (old-colour score after minus
before). For the base it also measures the ceiling the frozen autoencoder sets (:func:`autoencoder_round_trip`: how
often a generator image keeps its colour, by the checker, after the VAE encodes and decodes it). It writes
``results.json``, ``results.md`` (the table) and ``samples.png`` (per model a row of new-concept
samples and a row of old colours) and prints the table.

Builds on :func:`diffusion.inference.loading.load_checkpoint` (diffusers folders and Composer checkpoints, a LoRA
run's completed from its verified base), the sampling of :class:`diffusion.callbacks.prompt_following.
PromptFollowing` and :func:`diffusion.callbacks.image_grid.save_image_grid` (torchvision's ``save_image``).

Example:
    python -m diffusion.evaluation.finetune_report --base runs/demo_finetune/base \\
        --run lora=runs/demo_finetune/lora --run full=runs/demo_finetune/full --out runs/demo_finetune
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch

from diffusion.callbacks.image_grid import save_image_grid
from diffusion.callbacks.prompt_following import PromptFollowing
from diffusion.data.synthetic import NEW_COLORS, render_sample
from diffusion.evaluation.prompt_following import (
    DEMO_PROMPTS_PATH,
    FINETUNE_COLORS,
    FINETUNE_PROMPTS_PATH,
    dominant_color,
    score_prompt_following,
)

__all__ = ['CHECKPOINT', 'SAMPLING', 'autoencoder_round_trip', 'evaluate_model', 'markdown_table', 'run_facts', 'main']

#: The demo's sampling (yamls/demo.yaml's prompt_following): the same seeds, guidance and steps.
SAMPLING = {'seeds': (0, 1), 'guidance_scale': 3.0, 'num_inference_steps': 30}
#: The checkpoint a run folder's save folder points at.
CHECKPOINT = os.path.join('checkpoints', 'latest-rank0.pt')
_GRID_COLUMNS = 8
_TRAIN_TIME = re.compile(r'^\[metric\]\[batch=(\d+)\]: time/train: ([0-9.eE+-]+)')


def _score(
    model: Any, prompts_file: str, seeds: Sequence[int], guidance_scale: float
) -> tuple[dict[str, Any], torch.Tensor]:
    sampling = {**SAMPLING, 'seeds': tuple(seeds), 'guidance_scale': guidance_scale}
    sampler = PromptFollowing(prompts_file=prompts_file, **sampling)
    with torch.no_grad():
        images, prompts = sampler.sample(model)
    images = images.cpu()
    return score_prompt_following(images, prompts, colors=FINETUNE_COLORS), images


def evaluate_model(
    model: Any, seeds: Sequence[int] = SAMPLING['seeds'], guidance_scale: float = SAMPLING['guidance_scale']
) -> tuple[dict[str, Any], torch.Tensor]:
    """Scores of ``model`` on the new concept and the old colours, and its grid rows.

    Args:
        model: The model to sample.
        seeds (Sequence[int]): Sampling seeds, each prompt drawn once per seed. Default: the demo's two.
        guidance_scale (float): Classifier-free guidance. Default: the demo's.

    Returns:
        ``({'new': <colour score on the new-concept prompts>, 'old': <colour score on the demo prompts>, 'new_shape',
        'old_shape', 'per_image': {...}}, rows)`` where ``rows`` holds the first eight new-concept samples (seed 0)
        and one sample per old colour (its first prompt, seed 0).
    """
    new, new_images = _score(model, FINETUNE_PROMPTS_PATH, seeds, guidance_scale)
    old, old_images = _score(model, DEMO_PROMPTS_PATH, seeds, guidance_scale)
    per_prompt = len(seeds)
    shapes_per_color = len(old_images) // per_prompt // (len(FINETUNE_COLORS) - 1)
    rows = torch.cat(
        [new_images[::per_prompt][:_GRID_COLUMNS], old_images[:: per_prompt * shapes_per_color][:_GRID_COLUMNS]]
    )
    scores = {
        'new': new['color'],
        'old': old['color'],
        'new_shape': new['shape'],
        'old_shape': old['shape'],
        'num_new_images': len(new['per_image']),
        'num_old_images': len(old['per_image']),
        'per_image': {'new': new['per_image'], 'old': old['per_image']},
    }
    return scores, rows


def autoencoder_round_trip(model: Any, num_samples: int = 24, seed: int = 9, image_size: int = 32) -> dict[str, float]:
    """How often the model's autoencoder keeps a generator image's colour: ``{'new': ..., 'old': ...}``.

    ``num_samples`` images of the new colour, and as many of the palette's (the default data's draw), rendered at
    the training resolution, are encoded (the posterior's mode) and decoded by ``model.vae``; a hit is a decoded
    image whose dominant colour (among :data:`FINETUNE_COLORS`) is still the rendered one. Both fine-tuning methods
    keep the VAE frozen, so this is the ceiling of what a denoiser trained on its latents can draw.
    """
    hits: dict[str, float] = {}
    for key, new_color in (('new', next(iter(NEW_COLORS))), ('old', None)):
        found = []
        for index in range(num_samples):
            image, record = render_sample(index, seed, image_size, new_color=new_color)
            pixels = torch.as_tensor(np.array(image), dtype=torch.float32).permute(2, 0, 1)[None] / 127.5 - 1
            with torch.no_grad():
                latents = model.vae.encode(pixels).latent_dist.mode()
                decoded = (model.vae.decode(latents).sample[0].clamp(-1, 1) + 1) / 2
            found.append(dominant_color(decoded, FINETUNE_COLORS) == record['color'])
        hits[key] = float(np.mean(found))
    return hits


def _training_seconds(log_file: str) -> Optional[float]:
    """The last ``time/train`` that SpeedMonitor (``time_unit: seconds``) wrote to the run's file log, if any."""
    if not os.path.isfile(log_file):
        return None
    seconds = None
    with open(log_file, encoding='utf-8', errors='replace') as f:
        for line in f:
            match = _TRAIN_TIME.match(line)
            if match:
                seconds = float(match.group(2))
    return seconds


def run_facts(run_folder: str, model: Any) -> dict[str, Any]:
    """Trainable parameters of the run's model, its checkpoint's size in MB (10^6 bytes) and training minutes."""
    checkpoint = os.path.realpath(os.path.join(run_folder, CHECKPOINT))
    seconds = _training_seconds(os.path.join(run_folder, 'log.txt'))
    return {
        'trainable_parameters': sum(p.numel() for p in model.parameters() if p.requires_grad),
        'checkpoint': checkpoint,
        'checkpoint_mb': os.path.getsize(checkpoint) / 1e6,
        'minutes': None if seconds is None else seconds / 60.0,
    }


def markdown_table(results: dict[str, Any]) -> str:
    """The per-method table of ``results`` (as :func:`main` builds it)."""
    before = results['base']
    lines = [
        '| method | trainable parameters | checkpoint MB | training minutes | steps | new-concept score '
        '| old colours before | old colours after | change |',
        '|---|---:|---:|---:|---:|---:|---:|---:|---:|',
        f'| base (`make demo`) | - | - | - | - | {before["new"]:.2f} | {before["old"]:.2f} | - | - |',
    ]
    for name, run in results['runs'].items():
        minutes = '?' if run['minutes'] is None else f'{run["minutes"]:.1f}'
        lines.append(
            f'| {name} | {run["trainable_parameters"]:,} | {run["checkpoint_mb"]:.1f} | {minutes} | {run["batch"]} '
            f'| {run["new"]:.2f} | {before["old"]:.2f} | {run["old"]:.2f} | {run["old"] - before["old"]:+.2f} |'
        )
    trip = before.get('autoencoder_round_trip')
    if trip:
        lines.append(
            f'\nThe frozen autoencoder alone (encode, decode) keeps the colour of {trip["new"]:.2f} of new-colour '
            f'images and {trip["old"]:.2f} of old-colour ones: the ceiling of both methods.'
        )
    return '\n'.join(lines) + '\n'


def _parse_run(text: str) -> tuple[str, str]:
    name, sep, folder = text.partition('=')
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f'--run {text!r}: expected NAME=RUN_FOLDER, e.g. lora=runs/demo_finetune/lora')
    return name, folder


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Command line; see ``--help``."""
    parser = argparse.ArgumentParser(
        prog='python -m diffusion.evaluation.finetune_report', description=__doc__.splitlines()[0]
    )
    parser.add_argument('--base', required=True, help='The base model: a diffusers folder (or a Composer checkpoint).')
    parser.add_argument('--run', action='append', type=_parse_run, default=[], help='NAME=RUN_FOLDER, repeatable.')
    parser.add_argument('--out', required=True, help='Folder for results.json, results.md and samples.png.')
    parser.add_argument(
        '--seeds',
        type=int,
        nargs='+',
        default=list(SAMPLING['seeds']),
        help="Sampling seeds, each prompt drawn once per seed (default: the demo's 0 1). More seeds, less noise:"
        ' with 2, one old-colour image is 0.02 of the score.',
    )
    parser.add_argument(
        '--guidance-scale',
        type=float,
        default=SAMPLING['guidance_scale'],
        help="Classifier-free guidance of every sample (default: the demo's %(default)s).",
    )
    args = parser.parse_args(argv)
    from diffusion.inference.loading import load_checkpoint

    for what, path in [('--base', args.base), *((f'--run {n}', os.path.join(f, CHECKPOINT)) for n, f in args.run)]:
        if not os.path.exists(path):
            raise SystemExit(f'error: {what}: {path} does not exist')
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    base = load_checkpoint(args.base)
    base_scores, grid = evaluate_model(base.model, args.seeds, args.guidance_scale)
    base_scores['autoencoder_round_trip'] = autoencoder_round_trip(base.model)
    rows = [grid]
    del base
    results: dict[str, Any] = {
        'sampling': {**SAMPLING, 'seeds': list(args.seeds), 'guidance_scale': args.guidance_scale},
        'colors': list(FINETUNE_COLORS),
        'base': {'source': args.base, **base_scores},
        'runs': {},
    }
    for name, folder in args.run:
        loaded = load_checkpoint(os.path.join(folder, CHECKPOINT))
        scores, grid = evaluate_model(loaded.model, args.seeds, args.guidance_scale)
        rows.append(grid)
        results['runs'][name] = {'batch': loaded.batch, **run_facts(folder, loaded.model), **scores}
        del loaded
    with open(os.path.join(args.out, 'results.json'), 'w') as f:
        json.dump(results, f, indent=2)
    table = markdown_table(results)
    with open(os.path.join(args.out, 'results.md'), 'w') as f:
        f.write(table)
    save_image_grid(torch.cat(rows), os.path.join(args.out, 'samples.png'), nrow=_GRID_COLUMNS)
    order = ', '.join(['base', *results['runs']])
    print(table + f'\nSamples: {args.out}/samples.png (rows: new concept, then old colours, for {order})')
    return results


if __name__ == '__main__':
    main()
