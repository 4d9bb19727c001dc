"""Where a training step's time goes: VAE encode, text encode, UNet forward+backward, optimizer step.

Runs the production StableDiffusion model (tiny demo size, and the full SD2-base size) for a few steps at batch 1
on whatever device is present, timing each phase side by side in one run. The VAE and text-encoder fractions are
what precomputing latents saves; the last column is the speedup that would give.

    python benchmarks/step_breakdown.py                    # tiny at 32px and SD2-base at 256px
    python benchmarks/step_breakdown.py --models tiny --steps 20
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from diffusion.models import stable_diffusion_2, tiny_stable_diffusion

CASES = {
    # name: (factory, image resolution in pixels)
    'tiny': (tiny_stable_diffusion, 32),
    'sd2': (stable_diffusion_2, 256),
}
PHASES = ('vae_encode', 'text_encode', 'unet_fwd_bwd', 'optimizer_step')


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def time_steps(model, resolution: int, batch_size: int, steps: int, warmup: int, device: torch.device) -> dict:
    """Mean seconds per phase over ``steps`` steps after ``warmup`` steps."""
    model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    images = torch.rand(batch_size, 3, resolution, resolution, device=device) * 2 - 1
    input_ids = model.conditioner.tokenize(['a photo of a red circle on a striped gray background'] * batch_size)[
        'input_ids'
    ].to(device)
    totals = dict.fromkeys(PHASES, 0.0)
    for step in range(warmup + steps):
        marks = [time.perf_counter()]
        with torch.no_grad():
            mean, std = model.vae_moments(images)
            _sync(device)
            marks.append(time.perf_counter())
            text_embeds = model.conditioner.encode({'input_ids': input_ids})['text_embeds']
            _sync(device)
            marks.append(time.perf_counter())
        outputs = model({'image_latents_mean': mean, 'image_latents_std': std, 'text_embeds': text_embeds})
        model.loss(outputs, None).backward()
        _sync(device)
        marks.append(time.perf_counter())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        marks.append(time.perf_counter())
        if step >= warmup:
            for phase, start, end in zip(PHASES, marks, marks[1:]):
                totals[phase] += end - start
    return {phase: total / steps for phase, total in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', nargs='+', default=list(CASES), choices=list(CASES))
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--steps', type=int, default=None, help='measured steps (default: 20 tiny, 3 sd2)')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--json', default=None, help='also write the results here')
    args = parser.parse_args()
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    machine = torch.cuda.get_device_name() if device.type == 'cuda' else f'{platform.processor() or "cpu"}'
    print(f'device: {machine}, torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch_size}')

    rows = []
    for name in args.models:
        factory, resolution = CASES[name]
        torch.manual_seed(0)
        model = factory()
        unet_params = sum(p.numel() for p in model.unet.parameters())
        steps = args.steps or (20 if name == 'tiny' else 3)
        result = time_steps(model, resolution, args.batch_size, steps, args.warmup, device)
        total = sum(result.values())
        rows.append(
            {
                'model': name,
                'unet_params': unet_params,
                'resolution': resolution,
                'steps': steps,
                'seconds': result,
                'total': total,
            }
        )
        del model

    header = f'{"model":<6}{"px":>5}{"UNet params":>13}' + ''.join(f'{p:>17}' for p in PHASES)
    header += f'{"step":>10}{"precompute speedup":>20}'
    print(header)
    for row in rows:
        cells = ''.join(f'{row["seconds"][p] * 1e3:>9.1f} ms {row["seconds"][p] / row["total"]:>4.0%}' for p in PHASES)
        in_loop = row['seconds']['vae_encode'] + row['seconds']['text_encode']
        speedup = row['total'] / (row['total'] - in_loop)
        print(
            f'{row["model"]:<6}{row["resolution"]:>5}{row["unet_params"] / 1e6:>12.1f}M{cells}'
            f'{row["total"] * 1e3:>8.0f}ms{speedup:>19.2f}x'
        )
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'device': machine, 'batch_size': args.batch_size, 'rows': rows}, f, indent=2)


if __name__ == '__main__':
    main()
