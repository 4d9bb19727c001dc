"""Sample a prompt set to a folder of PNGs: ``python -m diffusion.inference.sample --checkpoint ... --out dir/``.

Each (prompt, seed) pair becomes ``{prompt_index:05d}_{seed}.png``, drawn with its own ``torch.Generator`` through
the model's ``generate`` (diffusers' pipeline accepts one generator per image), so that an image depends on its
prompt and seed only, not on the batch it was drawn in. ``samples.jsonl`` records the settings of every image and
makes a rerun resumable: an image whose file and settings are already there is skipped. ``contact_sheet.png`` puts
the images in a grid, one row per prompt (with the prompt as its caption) and one column per seed; it is drawn with
Pillow. Prompt files are read with :func:`diffusion.evaluation.prompts.load_prompt_set` (plain text, PartiPrompts,
DrawBench, COCO captions).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import textwrap
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from diffusion.evaluation.prompts import load_prompt_set
from diffusion.evaluation.sample_folder import CONTACT_SHEET, SAMPLES_FILE, image_filename, read_samples_file
from diffusion.inference.loading import load_checkpoint
from diffusion.models.noise import INFERENCE_SCHEDULERS
from diffusion.models.rectified_flow import FLOW_SCHEDULERS
from diffusion.utils import ConfigError, check_writable_folder

__all__ = [
    'CONTACT_SHEET',
    'SAMPLES_FILE',
    'image_filename',
    'main',
    'sample_to_folder',
    'to_uint8',
    'write_contact_sheet',
]

# Settings that decide an image's pixels besides its prompt and seed: a row that differs in one is redone.
_SETTINGS = (
    'lora',
    'prompt',
    'negative_prompt',
    'guidance_scale',
    'num_inference_steps',
    'scheduler',
    'height',
    'width',
    'conditioning',
)
# A contact sheet of thousands of prompts would be gigapixels: it shows the first rows at a bounded cell size.
MAX_SHEET_ROWS = 64
MAX_SHEET_CELL = 256
MIN_SHEET_CELL = 128  # tiny images are enlarged (nearest neighbour) so that the captions stay readable
# generate()'s SDXL micro-conditioning arguments, which the CLI takes as --original-size and so on.
CONDITIONING_FLAGS = ('original_size', 'crops_coords_top_left', 'target_size')


def default_image_size(model: Any) -> int:
    """The pipeline's default side in pixels: the denoiser's sample size times the autoencoder's factor."""
    return model.default_image_size


def _read_rows(path: str) -> dict[str, dict]:
    return {row['file']: row for row in read_samples_file(path)} if os.path.exists(path) else {}


def _write_rows(path: str, rows: list[dict]) -> None:
    tmp = f'{path}.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + '\n')
    os.replace(tmp, path)  # a kill mid-write keeps the previous ledger


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """One image (3, H, W) in [0, 1] as an (H, W, 3) uint8 array, rounded as diffusers' ``numpy_to_pil`` rounds."""
    return (image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _save_png(image: torch.Tensor, path: str) -> None:
    """Save one image (3, H, W) in [0, 1] as an 8-bit PNG (:func:`to_uint8`)."""
    tmp = f'{path}.tmp.png'
    Image.fromarray(to_uint8(image)).save(tmp)
    os.replace(tmp, path)


def _check_settings(
    prompts: Sequence[str], seeds: Sequence[int], batch_size: int, scheduler: str, scheduler_names: Sequence[str]
) -> None:
    if not prompts:
        raise ValueError('No prompts to sample.')
    if not seeds:
        raise ValueError('No seeds given: pass at least one.')
    if len(set(seeds)) != len(seeds):
        raise ValueError(f'Seeds repeat: {list(seeds)}; each seed names one image per prompt.')
    if batch_size < 1:
        raise ValueError(f'batch_size must be at least 1, got {batch_size}.')
    if scheduler not in scheduler_names:
        raise ValueError(f'Unknown scheduler {scheduler!r}. Valid names: {", ".join(scheduler_names)}.')


def sample_to_folder(
    model: Any,
    prompts: list[str],
    out_dir: str,
    seeds: Sequence[int] = (0,),
    batch_size: int = 8,
    guidance_scale: float = 7.5,
    num_inference_steps: int = 50,
    height: Optional[int] = None,
    width: Optional[int] = None,
    scheduler: Optional[str] = None,
    negative_prompt: Optional[str] = None,
    contact_sheet: bool = True,
    progress: bool = True,
    seed_per_prompt: bool = False,
    conditioning: Optional[dict[str, Sequence[int]]] = None,
    lora: Optional[str] = None,
) -> list[dict]:
    """Draw one image per (prompt, seed) into ``out_dir``; resumable.

    Args:
        model: A model with ``generate`` (e.g. :class:`~diffusion.models.StableDiffusion`).
        prompts (list[str]): The prompts; an image's index is its prompt's position in this list.
        out_dir (str): Output folder (created).
        seeds (Sequence[int]): Seeds; each prompt gets one image per seed. Default: ``(0,)``.
        batch_size (int): Images per ``generate`` call; does not change the images. Default: ``8``.
        guidance_scale (float): Classifier-free guidance scale. Default: ``7.5``.
        num_inference_steps (int): Sampler steps. Default: ``50``.
        height (int, optional): Image height; default: the model's native size.
        width (int, optional): Image width; default: the model's native size.
        scheduler (str, optional): Sampler name (``'ddim'``, ``'euler'``, ``'dpm++'``, ...); default: the model's
            ``inference_scheduler``.
        negative_prompt (str, optional): One negative prompt for every image.
        contact_sheet (bool): Also write ``contact_sheet.png``. Default: ``True``.
        progress (bool): Show a tqdm progress bar over images. Default: ``True``.
        seed_per_prompt (bool): Offset each seed by the prompt's index (prompt ``i`` gets seeds ``s + i``), so that
            no two prompts start from the same noise: what FID needs, and what the ``image_metrics`` callback draws.
            Default: ``False``.
        conditioning (dict, optional): SDXL's micro-conditioning for every image, any of ``original_size``,
            ``crops_coords_top_left`` and ``target_size`` (each ``(height, width)`` / ``(top, left)``); sizes
            default to the image size. Recorded in each row as ``conditioning``. Default: ``None``.
        lora (str, optional): The LoRA file already loaded onto ``model`` (:func:`~diffusion.inference.lora_files.
            load_lora`), recorded in each row as ``lora`` so that a rerun with another adapter draws again.

    Returns:
        list[dict]: One row per image, in (prompt, seed) order, as written to ``samples.jsonl``: ``file``,
        ``prompt_index``, ``prompt``, ``seed``, ``negative_prompt``, ``guidance_scale``, ``num_inference_steps``,
        ``scheduler``, ``height``, ``width`` (and ``conditioning`` when given).
    """
    scheduler = scheduler or model.objective.default_scheduler
    seeds = [int(s) for s in seeds]
    _check_settings(prompts, seeds, batch_size, scheduler, model.objective.scheduler_names)
    height = int(height or default_image_size(model))
    width = int(width or default_image_size(model))
    os.makedirs(out_dir, exist_ok=True)
    ledger = os.path.join(out_dir, SAMPLES_FILE)
    previous = _read_rows(ledger)

    conditioning = {name: [int(v) for v in value] for name, value in (conditioning or {}).items()}
    rows = []
    for index, prompt in enumerate(prompts):
        for seed in seeds:
            seed = seed + index if seed_per_prompt else seed
            rows.append(
                {
                    'file': image_filename(index, seed),
                    'prompt_index': index,
                    'prompt': prompt,
                    'seed': seed,
                    'negative_prompt': negative_prompt,
                    'guidance_scale': float(guidance_scale),
                    'num_inference_steps': int(num_inference_steps),
                    'scheduler': scheduler,
                    'height': height,
                    'width': width,
                    **({'conditioning': conditioning} if conditioning else {}),
                    **({'lora': lora} if lora else {}),
                }
            )

    def done(row: dict) -> bool:
        old = previous.get(row['file'])
        same = old is not None and all(old.get(key) == row.get(key) for key in _SETTINGS)
        return same and os.path.exists(os.path.join(out_dir, row['file']))

    todo = [row for row in rows if not done(row)]
    finished = {row['file'] for row in rows} - {row['file'] for row in todo}
    with tqdm(total=len(rows), initial=len(rows) - len(todo), desc='sampling', unit='img', disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            images = model.generate(
                [row['prompt'] for row in batch],
                negative_prompts=None if negative_prompt is None else [negative_prompt] * len(batch),
                guidance_scale=guidance_scale,
                num_inference_steps=num_inference_steps,
                seed=[row['seed'] for row in batch],
                height=height,
                width=width,
                scheduler=scheduler,
                **conditioning,
            )
            for row, image in zip(batch, images):
                _save_png(image, os.path.join(out_dir, row['file']))
                finished.add(row['file'])
            # Rows of finished images only (and earlier rows still valid), so an interrupted run resumes here.
            _write_rows(ledger, [row for row in rows if row['file'] in finished])
            bar.update(len(batch))
    _write_rows(ledger, rows)
    if contact_sheet:
        write_contact_sheet(out_dir, rows, os.path.join(out_dir, CONTACT_SHEET))
    return rows


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable with FreeType (Pillow >= 10.1)
    except (TypeError, OSError):
        return ImageFont.load_default()


def _wrap(text: str, font: Any, width: int, max_lines: int = 3) -> list[str]:
    """Lines of ``text`` that fit about ``width`` pixels, at most ``max_lines`` (the last one elided)."""
    char_width = max(font.getlength('abcdefghijklmnopqrstuvwxyz') / 26, 1.0)
    return textwrap.wrap(text, width=max(int(width / char_width), 8), max_lines=max_lines, placeholder=' ...') or ['']


def write_contact_sheet(out_dir: str, rows: list[dict], path: str, max_rows: int = MAX_SHEET_ROWS) -> str:
    """A grid of the images of ``rows``: one row per prompt, captioned with it; one column per seed.

    Shows the first ``max_rows`` prompts; cells are scaled to between 128 and 256 pixels wide.
    """
    prompts: dict[int, str] = {}
    seeds: list[int] = []
    for row in rows:
        prompts.setdefault(row['prompt_index'], row['prompt'])
        if row['seed'] not in seeds:
            seeds.append(row['seed'])
    indices = sorted(prompts)[:max_rows]
    first = Image.open(os.path.join(out_dir, rows[0]['file']))
    scale = min(max(MIN_SHEET_CELL / first.width, 1.0), MAX_SHEET_CELL / first.width)
    cell_w, cell_h = max(1, round(first.width * scale)), max(1, round(first.height * scale))
    pad, font = 4, _font(12)
    line_h = 15
    sheet_w = pad + len(seeds) * (cell_w + pad)
    captions = {i: _wrap(f'#{i}: {prompts[i]}', font, sheet_w - 2 * pad) for i in indices}
    header = line_h + pad
    sheet_h = header + sum(len(captions[i]) * line_h + cell_h + 2 * pad for i in indices)
    sheet = Image.new('RGB', (sheet_w, sheet_h), 'white')
    draw = ImageDraw.Draw(sheet)
    for column, seed in enumerate(seeds):
        draw.text((pad + column * (cell_w + pad), pad // 2), f'seed {seed}', fill='black', font=font)
    by_file = {row['file']: row for row in rows}
    y = header
    for i in indices:
        for line in captions[i]:
            draw.text((pad, y), line, fill='black', font=font)
            y += line_h
        y += pad
        for column, seed in enumerate(seeds):
            name = image_filename(i, seed)
            if name in by_file:
                with Image.open(os.path.join(out_dir, name)) as image:
                    cell = image.convert('RGB').resize((cell_w, cell_h), Image.NEAREST if scale >= 1 else Image.LANCZOS)
                sheet.paste(cell, (pad + column * (cell_w + pad), y))
        y += cell_h + pad
    tmp = f'{path}.tmp.png'
    sheet.save(tmp)
    os.replace(tmp, path)
    return path


def _seeds(args: argparse.Namespace) -> list[int]:
    if args.seeds is not None:
        if args.num_images_per_prompt is not None or args.seed is not None:
            raise SystemExit('error: give either --seeds or --num-images-per-prompt/--seed, not both')
        return args.seeds
    return list(range(args.seed or 0, (args.seed or 0) + (args.num_images_per_prompt or 1)))


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1, got {number}')
    return number


def _non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f'must be at least 0, got {number}')
    return number


def _conditioning(args: argparse.Namespace, model: Any) -> dict[str, list[int]]:
    given = {name: getattr(args, name) for name in CONDITIONING_FLAGS if getattr(args, name) is not None}
    accepted = inspect.signature(model.conditioner.pipeline_call_kwargs).parameters
    if any(name not in accepted for name in given):
        flags = ', '.join('--' + name.replace('_', '-') for name in given)
        conditioner = type(model.conditioner).__name__
        raise SystemExit(
            f'error: {flags} apply to SDXL models only; {type(model).__name__} with {conditioner} has no '
            'micro-conditioning'
        )
    return given


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m diffusion.inference.sample', description=__doc__.splitlines()[0])
    parser.add_argument('--checkpoint', required=True, help='Composer checkpoint (path or URI) or diffusers folder.')
    parser.add_argument('--config', help='Training yaml, when the checkpoint embeds none and has no run config.yaml.')
    parser.add_argument('--prompts', required=True, help='Prompt file (txt, PartiPrompts tsv, DrawBench, COCO json).')
    parser.add_argument('--category', help='Keep only this category of a PartiPrompts/DrawBench set.')
    parser.add_argument('--limit', type=_positive, help='Keep the first N prompts.')
    parser.add_argument('--out', required=True, help='Output folder.')
    parser.add_argument('--seeds', type=int, nargs='+', help='Seeds; one image per prompt and seed.')
    parser.add_argument('--num-images-per-prompt', type=_positive, help='With --seed S: seeds S, S+1, ...')
    parser.add_argument('--seed', type=int, help='First seed for --num-images-per-prompt. Default: 0.')
    parser.add_argument(
        '--seed-per-prompt', action='store_true', help='Prompt i gets seeds s + i (as the image_metrics callback).'
    )
    parser.add_argument('--batch-size', type=_positive, default=8)
    parser.add_argument('--guidance-scale', type=float, default=7.5)
    parser.add_argument('--negative-prompt')
    schedulers = [*INFERENCE_SCHEDULERS, *FLOW_SCHEDULERS]
    parser.add_argument('--scheduler', choices=schedulers, help="Default: the model's own.")
    parser.add_argument('--steps', type=_positive, default=50, help='Sampler steps.')
    parser.add_argument('--height', type=_positive)
    parser.add_argument('--width', type=_positive)
    sdxl = parser.add_argument_group('SDXL micro-conditioning (default: the image size, crop at 0 0)')
    sdxl.add_argument('--original-size', type=_positive, nargs=2, metavar=('HEIGHT', 'WIDTH'))
    sdxl.add_argument('--crops-coords-top-left', type=_non_negative, nargs=2, metavar=('TOP', 'LEFT'))
    sdxl.add_argument('--target-size', type=_positive, nargs=2, metavar=('HEIGHT', 'WIDTH'))
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--no-ema', action='store_true', help='Use the training weights even if EMA weights exist.')
    parser.add_argument('--no-contact-sheet', action='store_true')
    parser.add_argument(
        '--lora',
        metavar='PATH',
        help='Load this LoRA file (or folder with pytorch_lora_weights.safetensors; diffusers or kohya layout) onto '
        'the model first; a file for another base or with keys that match no layer is refused.',
    )
    return parser


def main(argv: Optional[list[str]] = None) -> list[dict]:
    """Command line; see ``--help``."""
    args = build_parser().parse_args(argv)
    seeds = _seeds(args)
    prompts = load_prompt_set(args.prompts, category=args.category, limit=args.limit)
    try:  # before the model loads, which takes minutes for SD2
        check_writable_folder(args.out, what='--out')
    except ConfigError as error:
        raise SystemExit(f'error: {error}') from None
    loaded = load_checkpoint(args.checkpoint, args.config, use_ema=not args.no_ema, device=args.device)
    print(f'Loaded {loaded.describe()}')
    lora = None
    if args.lora:
        from diffusion.inference.lora_files import LoraFileError, load_lora

        try:
            lora = load_lora(loaded.model, args.lora)['file']
        except LoraFileError as error:
            raise SystemExit(f'error: --lora {error}') from None
        print(f'LoRA: {lora}')
    conditioning = _conditioning(args, loaded.model)
    rows = sample_to_folder(
        loaded.model,
        prompts,
        args.out,
        seeds=seeds,
        seed_per_prompt=args.seed_per_prompt,
        batch_size=args.batch_size,
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.steps,
        height=args.height,
        width=args.width,
        scheduler=args.scheduler,
        negative_prompt=args.negative_prompt,
        contact_sheet=not args.no_contact_sheet,
        conditioning=conditioning,
        lora=lora,
    )
    print(f'{len(rows)} images ({len(prompts)} prompts x {len(seeds)} seeds) in {args.out}')
    return rows


if __name__ == '__main__':
    main()
