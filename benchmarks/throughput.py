"""Training throughput of the ~3x recipe's plugins, each measured side by side against the same baseline.

One process, the production ``StableDiffusion`` model and the same functions the yaml switches call
(``apply_attention_backend``, Composer's ``apply_low_precision_groupnorm/layernorm``, channels-last,
``apply_compile_denoiser``, ``apply_gradient_checkpointing``, batches of precomputed latents). The baseline is what a
plain trainer does: images through the VAE and captions through the text encoder at every step, math attention,
no compile, fp32 on CPU and plain bf16 autocast on GPU. Every other row adds one plugin to that baseline; the
``recipe`` row combines the speedups. Printed per row: images/s, the ratio to the baseline, and on GPU the
denoiser's MFU against the datasheet bf16 peak and against what a large bf16 matmul reaches on the card, plus peak
memory. The MFU's FLOPs are the model's own count (``model.denoiser.forward_flops``: torch's ``FlopCounterMode`` on
a meta-device copy of the network, at the run's latent size and the conditioner's ``conditioning_shapes``), times 3
for forward + backward, per image: 543 / 2,413 GFLOP for SD2-base at 256 / 512 px, 2,529 / 6,322 for SD3-medium.

The rows depend on the denoiser's family. A UNet (``tiny``, ``sd2``) gets every row above. A transformer
(``tiny_mmdit``: the tiny MMDiT; ``sd3``: the SD3-medium MMDiT, 2.03B parameters) trains on precomputed latents in
every row, the baseline included: SD3's encoders (T5-XXL, CLIP-G) are not run per step by any SD3 trainer, and the
``sd3`` model here is built with them cut to one narrow layer each (so they need not be materialised) while the
conditioning keeps SD3's shapes (77 + 256 tokens, 4,096 wide; pooled 2,048), in the columns the latents dataset
yields for the sd3 conditioner (``clip_embeds``, ``t5_embeds`` padded back, ``pooled_text_embeds``). Its rows: bf16
(CPU; the GPU baseline is bf16), gradient checkpointing and compile; joint attention has its own processor, which the
attention-backend switch refuses, and 1-D tokens have no channels-last layout.

Each model is built once (seeded) and every case trains a fresh copy of it, so all rows start from the same
weights. ``--cases`` picks rows by key (the baseline always runs); a row that runs out of GPU memory prints ``OOM``
and the run goes on. ``--json`` also writes the rows to a file.

    python benchmarks/throughput.py                       # CPU: tiny at 32 px and SD2-base at 256 px
    python benchmarks/throughput.py --models tiny_mmdit --steps 2                         # CPU, seconds
    python benchmarks/throughput.py --models sd2 --resolutions 256 512 --batch-size 32   # on a GPU
    python benchmarks/throughput.py --models sd2 --resolutions 512 --batch-size 16 --cases latents recipe
    python benchmarks/throughput.py --models sd3 --resolutions 256 512 --batch-size 16 4  # one batch per resolution
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from composer.algorithms.low_precision_groupnorm import apply_low_precision_groupnorm
from composer.algorithms.low_precision_layernorm import apply_low_precision_layernorm
from composer.core import Precision

from diffusion.algorithms import apply_attention_backend, apply_compile_denoiser, apply_gradient_checkpointing
from diffusion.data.latents import pad_t5
from diffusion.models import UNetDenoiser, stable_diffusion_2, tiny_stable_diffusion
from diffusion.models.sd3_factories import stable_diffusion_3, tiny_stable_diffusion_3

# SD3's text encoders cut to one narrow layer each: what the MMDiT sees keeps SD3's shapes (CLIP-L's and CLIP-G's
# projections 768 + 1280 wide, T5's d_model 4096, 77 + 256 tokens) without materialising T5-XXL (4.7B parameters)
# and CLIP-G (0.7B); 3.6M parameters in all. Only the precomputed-latents rows run them, once, to make the batch.
STUB_CLIP_CONFIG = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
STUB_T5_CONFIG = dict(vocab_size=256, d_kv=8, d_ff=64, num_layers=1, num_heads=1)


def sd3_medium_with_stub_text_encoders() -> Any:
    """SD3-medium's MMDiT and VAE, with :data:`STUB_CLIP_CONFIG` / :data:`STUB_T5_CONFIG` text encoders."""
    return stable_diffusion_3(
        text_encoder_config=STUB_CLIP_CONFIG,
        text_encoder_2_config=STUB_CLIP_CONFIG,
        text_encoder_3_config=STUB_T5_CONFIG,
    )


@dataclass(frozen=True)
class ModelSpec:
    """A model key: its factory and defaults (resolution, batch size on GPU and CPU; tiny models time 10 steps)."""

    factory: Callable[[], Any]
    resolution: int
    gpu_batch_size: int
    cpu_batch_size: int
    tiny: bool = False


MODELS: dict[str, ModelSpec] = {
    'tiny': ModelSpec(tiny_stable_diffusion, 32, 8, 8, tiny=True),
    'sd2': ModelSpec(stable_diffusion_2, 256, 32, 1),
    'tiny_mmdit': ModelSpec(tiny_stable_diffusion_3, 32, 8, 8, tiny=True),
    'sd3': ModelSpec(sd3_medium_with_stub_text_encoders, 256, 16, 1),
}
PEAK_TFLOPS = {'H100': (989.0, 790.0), 'H200': (989.0, 790.0), 'A100': (312.0, None)}  # datasheet, measured matmul
CAPTION = 'a photo of a red fox in the snow, Creative Commons'


def family(model: Any) -> str:
    """``'unet'`` or ``'transformer'``: which rows make sense for the model's denoiser."""
    return 'unet' if isinstance(model.denoiser, UNetDenoiser) else 'transformer'


def case_list(model_family: str, gpu: bool, with_compile: bool) -> list[tuple[str, str, dict[str, Any]]]:
    """(key, row name, switches) of every measured row; each switch set is applied on top of the baseline."""
    if model_family == 'transformer':
        # Precomputed latents in every row; no SDPA (joint attention has its own processor, which the backend switch
        # refuses), no low-precision norms, no channels-last (tokens are 1-D). The recipe would repeat a row: on GPU
        # the compile row (the baseline is bf16 there), on CPU the bf16 row.
        cases = [('baseline', 'baseline (precomputed latents)', dict(latents=True))]
        if not gpu:
            cases.append(('bf16', '+ bf16 autocast', dict(latents=True, bf16=True)))
        cases.append(('checkpointing', '+ gradient checkpointing', dict(latents=True, gradient_checkpointing=True)))
        if with_compile:
            cases.append(('compile', '+ torch.compile (denoiser)', dict(latents=True, compile=True)))
        return cases
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
        cases.append(('compile', '+ torch.compile (denoiser)', dict(compile=True)))
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
        if family(model) == 'unet':  # the baseline's math attention; MMDiT keeps its joint-attention processor
            apply_attention_backend(model, switches.get('attention', 'math'))
        if switches.get('low_precision_norms'):
            apply_low_precision_groupnorm(model, Precision.AMP_BF16)
            apply_low_precision_layernorm(model, Precision.AMP_BF16)
    if switches.get('channels_last'):
        model.denoiser.network.to(memory_format=torch.channels_last)
    if switches.get('gradient_checkpointing'):
        apply_gradient_checkpointing(model)
    if switches.get('compile'):
        apply_compile_denoiser(model)
    return model


def precomputed_text(conditioner: Any, captions: list[str]) -> dict[str, torch.Tensor]:
    """The text columns of a batch of precomputed latents, as the latents dataset yields them: T5 conditioners'
    stored columns (``t5_embeds`` padded back to ``max_length`` with its mask; SD3's ``clip_embeds`` and
    ``pooled_text_embeds``), or the conditioner's ``text_embeddings`` (CLIP, SDXL)."""
    if not hasattr(conditioner, 'stored_text_columns'):
        return conditioner.text_embeddings(captions)
    columns = conditioner.stored_text_columns(captions)
    out = {key: torch.stack(values) for key, values in columns.items() if isinstance(values[0], torch.Tensor)}
    padded = [pad_t5(states, conditioner.max_length) for states in columns['t5_embeds']]
    out['t5_embeds'] = torch.stack([states for states, _ in padded])
    out['t5_attention_mask'] = torch.stack([mask for _, mask in padded])
    return out


def make_batch(model: Any, resolution: int, batch_size: int, latents: bool, device: torch.device) -> dict:
    torch.manual_seed(1)
    images = torch.rand(batch_size, 3, resolution, resolution, device=device) * 2 - 1
    captions = [CAPTION] * batch_size
    if not latents:
        return {'image': images, **{k: v.to(device) for k, v in model.conditioner.tokenize(captions).items()}}
    with torch.no_grad():  # what the precompute stage stores, computed outside the timed steps
        mean, std = model.vae_moments(images)
        batch = {'image_latents_mean': mean, 'image_latents_std': std}
        batch.update({k: v.to(device) for k, v in precomputed_text(model.conditioner, captions).items()})
        conditioning = model.conditioner.conditioning(batch, False, (resolution, resolution))
    expected = model.conditioner.conditioning_shapes()  # what the FLOP count (and so the MFU) assumes
    shapes = {key: tuple(conditioning[key].shape[1:]) for key in expected}
    if shapes != expected:
        raise AssertionError(f'The batch conditions with {shapes}, the FLOPs are counted for {expected}.')
    return batch


def train_gflop_per_image(model: Any, resolution: int) -> float:
    """Denoiser FLOPs of one image's training step, forward + backward (3 x the forward the model counts)."""
    side = resolution // model.vae_scale_factor
    latent_shape = (int(model.vae.config.latent_channels), side, side)
    return 3 * model.denoiser.forward_flops(latent_shape, model.conditioner.conditioning_shapes()) / 1e9


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


def mfu(train_gflop: float, images_per_second: float, device_name: str) -> str:
    """Denoiser model FLOP utilisation against the card's datasheet peak and its measured matmul rate."""
    card = next((value for key, value in PEAK_TFLOPS.items() if key in device_name), None)
    if card is None:
        return '-'
    achieved = images_per_second * train_gflop / 1e3  # TFLOP/s
    datasheet, matmul = card
    return f'{achieved / datasheet:.1%}' + (f' / {achieved / matmul:.1%}' if matmul else '')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', nargs='+', default=['tiny', 'sd2'], choices=list(MODELS))
    parser.add_argument(
        '--resolutions', nargs='+', type=int, default=None, help='Default: 32 (tiny, tiny_mmdit), 256 (sd2, sd3).'
    )
    parser.add_argument(
        '--batch-size',
        nargs='+',
        type=int,
        default=None,
        help='One, or one per resolution. Default: 8 (tiny models); on GPU 32 (sd2), 16 (sd3); 1 on CPU.',
    )
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
        spec = MODELS[name]
        resolutions = args.resolutions or [spec.resolution]
        batch_sizes = args.batch_size or [spec.gpu_batch_size if gpu else spec.cpu_batch_size]
        if len(batch_sizes) not in (1, len(resolutions)):
            parser.error(f'--batch-size takes one value or one per resolution ({len(resolutions)}).')
        batch_sizes = batch_sizes * len(resolutions) if len(batch_sizes) == 1 else batch_sizes
        steps = args.steps or (10 if spec.tiny or gpu else 2)
        warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
        torch.manual_seed(0)
        pristine = spec.factory()  # built once on the CPU; each case trains a copy
        model_family = family(pristine)
        all_cases = case_list(model_family, gpu, args.compile or gpu)
        cases = [c for c in all_cases if not args.cases or c[0] in {'baseline', *args.cases}]
        skipped = sorted(set(args.cases or ()) - {key for key, _, _ in all_cases})
        if skipped:
            print(f'\n{name} ({model_family}): no {", ".join(skipped)} row here')
        for resolution, batch_size in zip(resolutions, batch_sizes):
            train_gflop = train_gflop_per_image(pristine, resolution)
            print(
                f'\n{name} at {resolution} px, batch {batch_size}, {steps} steps after {warmup} warm-up; '
                f'{type(pristine.denoiser.network).__name__}: {train_gflop:,.4g} GFLOP per image (forward + backward)'
            )
            print('| case | step | images/s | vs baseline | denoiser MFU (datasheet / matmul) | peak memory |')
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
                    utilisation = mfu(train_gflop, images_per_second, device_name) if gpu else '-'
                    shown = f'{ratio:.2f}x' if ratio else '-'
                    step = f'{seconds * 1e3:,.0f} ms'
                    print(
                        f'| {case} | {step} | {images_per_second:.3g} | {shown} | {utilisation} | {memory} |',
                        flush=True,
                    )
                    row.update(seconds=seconds, images_per_second=images_per_second, vs_baseline=ratio, mfu=utilisation)
                row.update(key=key, train_gflop_per_image=train_gflop, torch=torch.__version__, peak_memory=memory)
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
