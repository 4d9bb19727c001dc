"""Time per training step of the demo's three model families, side by side in one process.

The demo's yamls as `make demo` and `make demo-mmdit` build them (model, dataloader, optimizer from the yaml, through
:func:`diffusion.builders.build_model`, ``build_dataloader`` and ``build_optimizer``): UNet + DDPM
(``yamls/demo.yaml``), UNet + rectified flow (the same yaml with ``model.objective: rectified_flow``) and MMDiT +
rectified flow (``yamls/demo_mmdit.yaml``). Each family takes its steps (forward, loss, backward, optimizer step on
the demo's batches of 32 at 32 px) in rounds that rotate the order (a b c, b c a, c a b), so that load on the
machine falls on all alike; reported: parameters of the denoiser and median ms per step. Multiplied by the steps a
family needs to reach a colour score (from its run's `prompt_following` log), this gives its training minutes
without other jobs' noise in them.

    python benchmarks/demo_families.py --autoencoder runs/demo_autoencoder/pretrained --data data/demo/train
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from diffusion.builders import build_dataloader, build_model, build_optimizer
from diffusion.config import load_config

FLOW = (
    '~model.prediction_type',
    '~model.min_snr_gamma',
    '~model.inference_scheduler',
    '+model.objective={name:rectified_flow,timestep_sampling:logit_normal,logit_mean:0.0,logit_std:1.0,shift:1.0,'
    'inference_scheduler:flow_euler}',
)
FAMILIES = {
    'unet_ddpm': ('yamls/demo.yaml', ()),
    'unet_flow': ('yamls/demo.yaml', FLOW),
    'mmdit_flow': ('yamls/demo_mmdit.yaml', ()),
}


def build(yaml: str, overrides: tuple[str, ...], autoencoder: str, data: str):
    cfg = load_config(yaml, [f'model.pretrained_model_name_or_path={autoencoder}', f'train_dataloader.remote={data}',
                             *overrides])  # fmt: skip
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    model.train()
    loader = build_dataloader(cfg.train_dataloader, model, 'train_dataloader')
    optimizer = build_optimizer(cfg.optimizer, model)
    batches = iter(loader)
    return model, optimizer, batches


def step(model, optimizer, batch) -> None:
    loss = model.loss(model(batch), batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--autoencoder', default='runs/demo_autoencoder/pretrained')
    parser.add_argument('--data', default='data/demo/train')
    parser.add_argument('--rounds', type=int, default=4)
    parser.add_argument('--steps', type=int, default=6, help='Timed steps per family per round (after one untimed).')
    parser.add_argument('--threads', type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = {name: build(yaml, overrides, args.autoencoder, args.data) for name, (yaml, overrides) in FAMILIES.items()}
    # Batches are fetched before the clock starts: the step, not the dataloader, is timed here.
    fetched = {name: [next(batches) for _ in range(args.steps + 1)] for name, (_, _, batches) in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for round_index in range(args.rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            model, optimizer, _ = runs[name]
            step(model, optimizer, fetched[name][0])
            for batch in fetched[name][1:]:
                start = time.perf_counter()
                step(model, optimizer, batch)
                times[name].append(time.perf_counter() - start)
    results = {}
    print('| family | denoiser parameters | ms per step |')
    print('|---|---:|---:|')
    for name, (model, _, _) in runs.items():
        parameters = sum(p.numel() for p in model.denoiser.network.parameters())
        ms = statistics.median(times[name]) * 1000
        results[name] = {'denoiser_parameters': parameters, 'ms_per_step': ms}
        print(f'| {name} | {parameters:,} | {ms:.0f} |')
    print(json.dumps(results))


if __name__ == '__main__':
    main()
