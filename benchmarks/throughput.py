"""Training throughput of the ~3x recipe's plugins, each measured side by side against the same baseline.

One process, the production ``StableDiffusion`` model and the same functions the yaml switches call
(``apply_attention_backend``, Composer's ``apply_low_precision_groupnorm/layernorm``, channels-last,
``apply_compile_denoiser``, ``apply_gradient_checkpointing``, batches of precomputed latents). The baseline is what a
plain trainer does: images through the VAE and captions through the text encoder at every step, math attention,
no compile, fp32 on CPU and plain bf16 autocast on GPU. Every other row adds one plugin to that baseline; the
``recipe`` row combines the speedups. Printed per row: images/s, the ratio to the baseline, and on GPU the UNet
MFU (539 / 2,409 GFLOP per image at 256 / 512 px, forward + backward, from torch's FlopCounterMode) against the
datasheet bf16 peak and against what a large bf16 matmul reaches on the card, plus peak memory.

Each model is built once (seeded) and every case trains a fresh copy of it, so all rows start from the same
weights. ``--cases`` picks rows by key (the baseline always runs); a row that runs out of GPU memory prints ``OOM``
and the run goes on. ``--json`` also writes the rows to a file.

    python benchmarks/throughput.py                       # CPU: tiny at 32 px and SD2-base at 256 px
    python benchmarks/throughput.py --models sd2 --resolutions 256 512 --batch-size 32   # on a GPU
    python benchmarks/throughput.py --models sd2 --resolutions 512 --batch-size 16 --cases latents recipe
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import time
import warnings
from typing import Any, Callable

import torch
from composer.algorithms.low_precision_groupnorm import apply_low_precision_groupnorm
from composer.algorithms.low_precision_layernorm import apply_low_precision_layernorm
from composer.core import Precision

from diffusion.algorithms import apply_attention_backend, apply_compile_denoiser, apply_gradient_checkpointing
from diffusion.models import stable_diffusion_2, tiny_stable_diffusion

FACTORIES: dict[str, Callable[[], Any]] = {'tiny': tiny_stable_diffusion, 'sd2': stable_diffusion_2}
UNET_TRAIN_GFLOP = {256: 539.0, 512: 2409.0}  # SD2 UNet forward + backward per image (FlopCounterMode)
PEAK_TFLOPS = {'H100': (989.0, 790.0), 'H200': (989.0, 790.0), 'A100': (312.0, None)}  # datasheet, measured matmul


def case_list(gpu: bool, with_compile: bool) -> list[tuple[str, str, dict[str, Any]]]:
    """(key, row name, switches) of every measured row; each switch set is applied on top of the baseline."""
    recipe = dict(latents=True, attention='sdpa', bf16=True, low_precision_norms=True, channels_last=True)
    cases = [
        ('baseline', 'baseline', {}),
        ('latents', '+ precomputed latents', dict(latents=True)),
        ('sdpa', '+ SDPA attention', dict(attention='sdpa')),
    ]
    if not gpu:  # the GPU baseline is already bf16
        cases.append(('bf16', '+ bf16 autocast', dict(bf16=True)))
    cases += [
        ('norms', '+ low-precision norms (bf16)', dict(bf16=True, low_precision_norms=True)),
        ('channels_last', '+ channels-last', dict(channels_last=True)),
        ('checkpointing', '+ gradient checkpointing', dict(gradient_checkpointing=True)),
    ]
    if with_compile:
        cases.append(('compile', '+ torch.compile (UNet)', dict(compile=True)))
        recipe['compile'] = True
    cases.append(('recipe', 'recipe (all speedups)', recipe))
    return cases


CASE_KEYS = ('baseline', 'latents', 'sdpa', 'bf16', 'norms', 'channels_last', 'checkpointing', 'compile', 'recipe')


def build(pristine: Any, switches: dict[str, Any], device: torch.device) -> Any:
    """A copy of ``pristine`` (the seeded, untouched model) on ``device`` with ``switches`` applied."""
    model = copy.deepcopy(pristine)
    model.to(device).train()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # NoEffectWarning for models without LayerNorm etc.
        apply_attention_backend(model, switches.get('attention', 'math'))
        if switches.get('low_precision_norms'):
            apply_low_precision_groupnorm(model, Precision.AMP_BF16)
            apply_low_precision_layernorm(model, Precision.AMP_BF16)
    if switches.get('channels_last'):
        model.unet.to(memory_format=torch.channels_last)
    if switches.get('gradient_checkpointing'):
        apply_gradient_checkpointing(model)
    if switches.get('compile'):
        apply_compile_denoiser(model)
    return model


def make_batch(model: Any, resolution: int, batch_size: int, latents: bool, device: torch.device) -> dict:
    torch.manual_seed(1)
    images = torch.rand(batch_size, 3, resolution, resolution, device=device) * 2 - 1
    input_ids = model.conditioner.tokenize(['a photo of a red fox in the snow, Creative Commons'] * batch_size)[
        'input_ids'
    ].to(device)
    if not latents:
        return {'image': images, 'input_ids': input_ids}
    with torch.no_grad():  # what the precompute stage stores, computed outside the timed steps
        mean, std = model.vae_moments(images)
        return {
            'image_latents_mean': mean,
            'image_latents_std': std,
            'text_embeds': model.conditioner.encode({'input_ids': input_ids})['text_embeds'],
        }


def measure(model: Any, batch: dict, bf16: bool, steps: int, warmup: int, device: torch.device) -> float:
    """Mean seconds per training step (forward, loss, backward, AdamW step) after ``warmup`` steps."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5, fused=device.type == 'cuda')
    total = 0.0
    for step in range(warmup + steps):
        if device.type == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model.loss(model(batch), batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        if step >= warmup:
            total += time.perf_counter() - start
    return total / steps


def unet_mfu(name: str, resolution: int, images_per_second: float, device_name: str) -> str:
    """UNet model FLOP utilisation against the card's datasheet peak and its measured matmul rate."""
    card = next((value for key, value in PEAK_TFLOPS.items() if key in device_name), None)
    if name != 'sd2' or resolution not in UNET_TRAIN_GFLOP or card is None:
        return '-'
    achieved = images_per_second * UNET_TRAIN_GFLOP[resolution] / 1e3  # TFLOP/s
    datasheet, matmul = card
    return f'{achieved / datasheet:.1%}' + (f' / {achieved / matmul:.1%}' if matmul else '')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', nargs='+', default=['tiny', 'sd2'], choices=list(FACTORIES))
    parser.add_argument('--resolutions', nargs='+', type=int, default=None, help='Default: 32 (tiny), 256 (sd2).')
    parser.add_argument('--batch-size', type=int, default=None, help='Default: 8 (tiny), 1 on CPU / 32 on GPU (sd2).')
    parser.add_argument('--steps', type=int, default=None, help='Timed steps. Default: 10 (tiny), 2 CPU / 10 GPU.')
    parser.add_argument('--warmup', type=int, default=None, help='Default: 1 on CPU, 3 on GPU.')
    parser.add_argument('--compile', action='store_true', help='Add torch.compile rows (default on GPU).')
    parser.add_argument('--cases', nargs='+', choices=CASE_KEYS, default=None, help='Rows to run (default: all).')
    parser.add_argument('--json', default=None, help='Also write every row to this JSON file.')
    args = parser.parse_args()

    gpu = torch.cuda.is_available()
    device = torch.device('cuda' if gpu else 'cpu')
    device_name = (
        torch.cuda.get_device_name() if gpu else f'{platform.machine()} CPU, {torch.get_num_threads()} threads'
    )
    print(f'device: {device_name}; torch {torch.__version__}')
    rows = []
    for name in args.models:
        resolutions = args.resolutions or ([32] if name == 'tiny' else [256])
        batch_size = args.batch_size or (8 if name == 'tiny' else 32 if gpu else 1)
        steps = args.steps or (10 if name == 'tiny' or gpu else 2)
        warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
        torch.manual_seed(0)
        pristine = FACTORIES[name]()  # built once on the CPU; each case trains a copy
        cases = [c for c in case_list(gpu, args.compile or gpu) if not args.cases or c[0] in {'baseline', *args.cases}]
        for resolution in resolutions:
            print(f'\n{name} at {resolution} px, batch {batch_size}, {steps} steps after {warmup} warm-up')
            print('| case | step | images/s | vs baseline | UNet MFU (datasheet / matmul) | peak memory |')
            print('|---|---:|---:|---:|---:|---:|')
            base = None
            for key, case, switches in cases:
                if gpu:
                    torch.cuda.reset_peak_memory_stats()
                model = batch = None
                try:
                    model = build(pristine, switches, device)
                    batch = make_batch(model, resolution, batch_size, switches.get('latents', False), device)
                    seconds = measure(model, batch, switches.get('bf16', gpu), steps, warmup, device)
                except torch.cuda.OutOfMemoryError:
                    seconds = None
                memory = f'{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB' if gpu else '-'
                row = dict(model=name, resolution=resolution, batch_size=batch_size, case=case, device=device_name)
                if seconds is None:
                    print(f'| {case} | OOM | - | - | - | {memory} |', flush=True)
                else:
                    images_per_second = batch_size / seconds
                    if key == 'baseline':
                        base = images_per_second
                    ratio = images_per_second / base if base else None
                    mfu = unet_mfu(name, resolution, images_per_second, device_name) if gpu else '-'
                    shown = f'{ratio:.2f}x' if ratio else '-'
                    step = f'{seconds * 1e3:,.0f} ms'
                    print(f'| {case} | {step} | {images_per_second:.3g} | {shown} | {mfu} | {memory} |', flush=True)
                    row.update(seconds=seconds, images_per_second=images_per_second, vs_baseline=ratio, unet_mfu=mfu)
                row.update(key=key, torch=torch.__version__, peak_memory=memory)
                rows.append(row)
                if args.json:
                    with open(args.json, 'w') as f:  # after every row: a run cut short keeps what it measured
                        json.dump(rows, f, indent=2)
                del model, batch
                gc.collect()
                if gpu:
                    torch.cuda.empty_cache()


if __name__ == '__main__':
    main()
