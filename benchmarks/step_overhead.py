"""The framework's cost per training step: a bare PyTorch loop against the same model in Composer's ``Trainer``.

Three ways to train the same tiny latent-diffusion model (loaded through ``pretrained_components`` from a diffusers
folder the benchmark writes), on the same batches from the same seed, with the same optimizer (``torch.optim.AdamW``),
run in one process and in alternation (a, b, c, then b, c, a, ...) so that load on the machine falls on all three alike:

    (a) ``bare``: a loop written here on the diffusers modules: VAE encode and text encode without gradients (or the
        precomputed moments and embeddings), DDPM noise, UNet forward, MSE, backward, step, zero_grad. Batches come
        from a list in memory.
    (b) ``trainer``: the project's ``StableDiffusion`` in Composer's ``Trainer`` as ``train.py`` builds it
        (:func:`diffusion.builders.build_trainer`: its checks, built-in callbacks and checkpoint guards), with no
        yaml callbacks or loggers, fed the same in-memory batches.
    (c) ``full``: (b) with the streaming dataloader of the run (MDS shards, decode, transforms, replacement checks,
        licence and fingerprint checks) and the callbacks and loggers a run yaml sets (``lr_monitor``,
        ``speed_monitor``, ``replaced_sample_monitor``, the file logger).

The time of a step is the wall time between the ends of two consecutive steps (so (c) includes fetching and
decoding its batch); the first step of each chunk is left out. Reported: median ms per step and the ratio to (a),
for images and for precomputed latents at each resolution; per step, the wall time outside the model's work (a
step less its forward, loss, backward and optimizer step: the batch fetch and what the loop or framework adds, which
the run-to-run drift of the operators' own speed does not blur), and the process's CPU time, its system time and
its minor page faults (memory the allocator gave back to the kernel and touches again).

    python benchmarks/step_overhead.py                          # 32 and 64 px, images and latents
    python benchmarks/step_overhead.py --resolutions 64 --inputs images --rounds 4 --steps 15
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from composer import Callback, Event
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel

from diffusion.builders import build_trainer
from diffusion.data.synthetic import write_synthetic_dataset
from diffusion.models import tiny_stable_diffusion

BATCH_SIZE = 16
NUM_IMAGES = 256
MODES = ('bare', 'trainer', 'full')


def prepare(root: str, resolution: int) -> dict[str, str]:
    """The pipeline folder, the image shards and the precomputed-latent shards (written once per ``root``)."""
    paths = {
        'pipeline': os.path.join(root, 'pipeline'),
        'images': os.path.join(root, f'images_{resolution}'),
        'latents': os.path.join(root, f'latents_{resolution}'),
    }
    if not os.path.isdir(paths['pipeline']):
        torch.manual_seed(0)
        tiny_stable_diffusion().pipeline().save_pretrained(paths['pipeline'], safe_serialization=True)
    if not os.path.isdir(paths['images']):
        write_synthetic_dataset(paths['images'], NUM_IMAGES, seed=0, image_size=resolution, progress=False)
    if not os.path.isdir(paths['latents']):
        config = os.path.join(root, 'precompute.yaml')
        with open(config, 'w') as f:
            json.dump(config_dict(paths, 'images', resolution, full=False, run_folder=root), f)
        subprocess.run(
            [sys.executable, '-m', 'diffusion.pipeline', 'precompute', '--input', paths['images'], '--config', config,
             '--out', paths['latents'], '--no-progress'],
            check=True,
        )  # fmt: skip
    return paths


def config_dict(paths: dict[str, str], inputs: str, resolution: int, full: bool, run_folder: str) -> dict[str, Any]:
    """The run config of (b) and (c): the model from the pipeline folder, AdamW, fp32, no eval, no checkpoints."""
    dataloader: dict[str, Any] = {'name': 'image_caption', 'remote': paths['images'], 'resolution': resolution}
    if inputs == 'latents':
        dataloader = {'name': 'latents', 'remote': paths['latents']}
    return {
        'run_name': f'step_overhead_{inputs}_{resolution}_{"full" if full else "trainer"}',
        'run_folder': run_folder,
        'seed': 17,
        'model': {
            'name': 'tiny_stable_diffusion',
            'pretrained_model_name_or_path': paths['pipeline'],
            'pretrained_components': ['unet', 'vae', 'text_encoder', 'tokenizer'],
            'prediction_type': 'epsilon',
        },
        'train_dataloader': {
            **dataloader,
            'batch_size': BATCH_SIZE,
            **({'crop': 'center'} if inputs == 'images' else {}),
        },
        'max_duration': '1000000ba',
        'optimizer': {'name': 'adamw', 'lr': 1.0e-4},
        'precision': 'fp32',
        'progress_bar': False,
        'callbacks': (
            {'lr_monitor': {}, 'speed_monitor': {'window_size': 10}, 'replaced_sample_monitor': {}} if full else {}
        ),
        'loggers': {'file': {'filename': os.path.join(run_folder, 'log.txt')}} if full else {},
    }


Mark = tuple[float, float, float, int, float]


def mark(work: float) -> Mark:
    """Wall time, the process's user and system CPU time, its minor page faults, and ``work`` (the seconds spent so
    far in the model's forward, loss, backward and optimizer step).

    System time and page faults tell apart work in the kernel (memory the allocator returns to the system and maps
    again on the next step) from Python and kernel work in the process's own code. A step's wall time less its
    model work is what the loop around the model costs: the batch fetch and, in (b) and (c), Composer's events,
    collectives, logging and callbacks. Unlike the ratio of whole steps, it does not move with the few percent by
    which the same operators run faster or slower from one stretch of time to the next on a shared VM."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), usage.ru_utime, usage.ru_stime, usage.ru_minflt, work


class StepClock(Callback):
    """Marks at the end of every training step, the wall time spent fetching batches, and the model's work: the
    time between Composer's BEFORE/AFTER_FORWARD, BEFORE/AFTER_LOSS and BEFORE/AFTER_BACKWARD events, and the
    optimizer's weight update (timed by torch's optimizer step hooks, as Composer runs no event around it)."""

    PAIRS = {Event.AFTER_FORWARD: Event.BEFORE_FORWARD, Event.AFTER_LOSS: Event.BEFORE_LOSS,
             Event.AFTER_BACKWARD: Event.BEFORE_BACKWARD}  # fmt: skip

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.marks: list[Mark] = []
        self.fetch: list[float] = []
        self.work = 0.0
        self._started: dict[Any, float] = {}
        self._update_start = 0.0
        optimizer.register_step_pre_hook(lambda *_: self._mark_update_start())
        optimizer.register_step_post_hook(lambda *_: self._add_update())

    def _mark_update_start(self) -> None:
        self._update_start = time.perf_counter()

    def _add_update(self) -> None:
        # Composer passes the forward and backward to the optimizer's step as its closure (fp32, bf16), which ends
        # with AFTER_TRAIN_BATCH: the weight update is what follows it.
        self.work += time.perf_counter() - self._update_start

    def run_event(self, event: Event, state, logger) -> None:
        now = time.perf_counter()
        if event == Event.BEFORE_DATALOADER or event in self.PAIRS.values():
            self._started[event] = now
        elif event == Event.AFTER_DATALOADER:
            self.fetch.append(now - self._started.pop(Event.BEFORE_DATALOADER))
        elif event in self.PAIRS:
            self.work += now - self._started.pop(self.PAIRS[event])
        elif event == Event.AFTER_TRAIN_BATCH:
            self._update_start = now
        elif event == Event.BATCH_END:
            self.marks.append(mark(self.work))


def cycle(batches: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    while True:
        yield from batches


class InMemory:
    """An endless iterable over the same batches, for Composer's ``fit(train_dataloader=...)``."""

    def __init__(self, batches: list[dict[str, Any]]):
        self.batches = batches

    def __iter__(self):
        return cycle(self.batches)


def bare_runner(paths: dict[str, str], batches: list[dict[str, Any]], inputs: str) -> Callable[[int], list[Mark]]:
    """(a): a training loop on the diffusers modules, loaded from the same folder with the same seed."""
    torch.manual_seed(17)
    unet = UNet2DConditionModel.from_pretrained(paths['pipeline'], subfolder='unet', use_safetensors=True).train()
    vae = AutoencoderKL.from_pretrained(paths['pipeline'], subfolder='vae', use_safetensors=True).eval()
    text_encoder = CLIPTextModel.from_pretrained(paths['pipeline'], subfolder='text_encoder', use_safetensors=True)
    text_encoder.eval()
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    scheduler = DDPMScheduler.from_pretrained(paths['pipeline'], subfolder='scheduler')
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1.0e-4)
    stream = cycle(batches)
    work = 0.0

    def step(batch: dict[str, Any]) -> None:
        nonlocal work
        start = time.perf_counter()
        with torch.no_grad():
            if inputs == 'images':
                moments = vae.encode(batch['image']).latent_dist
                mean, std = moments.mean, moments.std
                text_embeds = text_encoder(batch['input_ids'])[0]
            else:
                mean, std = batch['image_latents_mean'].float(), batch['image_latents_std'].float()
                text_embeds = batch['text_embeds'].float()
            latents = (mean + std * torch.randn_like(mean)) * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],))
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, text_embeds).sample
        F.mse_loss(prediction.float(), noise.float()).backward()
        optimizer.step()
        work += time.perf_counter() - start
        optimizer.zero_grad(set_to_none=True)

    def run(steps: int) -> list[Mark]:
        marks = []
        for _ in range(steps):
            step(next(stream))
            marks.append(mark(work))
        return marks

    return run


def trainer_runner(
    paths: dict[str, str], batches: list[dict[str, Any]], inputs: str, resolution: int, full: bool, scratch: str
) -> Callable[[int], list[Mark]]:
    """(b) and (c): ``build_trainer`` as ``train.py`` calls it; (b) is fitted on the in-memory batches."""
    run_folder = tempfile.mkdtemp(dir=scratch)
    trainer = build_trainer(config_dict(paths, inputs, resolution, full, run_folder))
    clock = StepClock(trainer.state.optimizers[0])
    trainer.state.callbacks.append(clock)
    memory = None if full else InMemory(batches)

    def run(steps: int) -> list[Mark]:
        clock.marks, clock.fetch = [], []
        if memory is None:
            trainer.fit(duration=f'{steps}ba')
        else:
            trainer.fit(train_dataloader=memory, duration=f'{steps}ba')
        fetched.extend(clock.fetch[1:])  # as the steps: the first of a chunk is left out
        return clock.marks

    fetched: list[float] = []
    run.fetched = fetched  # type: ignore[attr-defined]
    return run


def collect_batches(paths: dict[str, str], inputs: str, resolution: int, scratch: str, count: int) -> list[dict]:
    """``count`` batches from the run's own dataloader (so (a) and (b) see exactly what (c) decodes)."""
    trainer = build_trainer(config_dict(paths, inputs, resolution, False, tempfile.mkdtemp(dir=scratch)))
    batches = []
    for batch in trainer.state.train_dataloader:
        batches.append(batch)
        if len(batches) == count:
            break
    trainer.close()
    return batches


def measure(case: tuple[int, str], rounds: int, steps: int, scratch: str) -> dict[str, Any]:
    resolution, inputs = case
    paths = prepare(scratch, resolution)
    batches = collect_batches(paths, inputs, resolution, scratch, NUM_IMAGES // BATCH_SIZE)
    runners = {
        'bare': bare_runner(paths, batches, inputs),
        'trainer': trainer_runner(paths, batches, inputs, resolution, False, scratch),
        'full': trainer_runner(paths, batches, inputs, resolution, True, scratch),
    }
    for run in runners.values():  # warm-up: first-call allocations, the streaming iterator
        run(3)
    # Per step and mode: wall seconds, CPU seconds (user + system), system seconds, minor page faults, the wall
    # seconds outside the model's work (the loop's own: fetch, framework, callbacks) and those in it.
    steps_of: dict[str, list[tuple[float, float, float, int, float, float]]] = {mode: [] for mode in MODES}
    for round_index in range(rounds):
        # Each round starts with another mode, so that no mode always follows the same one (the caches and the
        # allocator's free lists the previous mode leaves are shared by all three alike).
        order = MODES[round_index % len(MODES) :] + MODES[: round_index % len(MODES)]
        for mode in order:
            marks = runners[mode](steps + 1)
            steps_of[mode] += [
                (
                    b[0] - a[0],
                    b[1] + b[2] - a[1] - a[2],
                    b[2] - a[2],
                    b[3] - a[3],
                    b[0] - a[0] - (b[4] - a[4]),
                    b[4] - a[4],
                )
                for a, b in zip(marks, marks[1:])
            ]

    def median(mode: str, column: int, scale: float = 1000.0) -> float:
        return statistics.median(row[column] for row in steps_of[mode]) * scale

    medians = {mode: median(mode, 0) for mode in MODES}
    cpu_medians = {mode: median(mode, 1) for mode in MODES}
    fetch = {mode: statistics.median(getattr(runners[mode], 'fetched', None) or [0.0]) * 1000 for mode in MODES}
    return {
        'resolution': resolution,
        'inputs': inputs,
        'steps_per_mode': len(steps_of['bare']),
        'ms_per_step': {mode: round(value, 1) for mode, value in medians.items()},
        'ratio_to_bare': {mode: round(value / medians['bare'], 3) for mode, value in medians.items()},
        'fetch_ms_per_step': {mode: round(value, 1) for mode, value in fetch.items()},
        'cpu_ms_per_step': {mode: round(value, 1) for mode, value in cpu_medians.items()},
        'cpu_ratio_to_bare': {mode: round(value / cpu_medians['bare'], 3) for mode, value in cpu_medians.items()},
        'system_ms_per_step': {mode: round(median(mode, 2), 1) for mode in MODES},
        'minor_faults_per_step': {mode: round(median(mode, 3, 1.0)) for mode in MODES},
        'outside_model_ms_per_step': {mode: round(median(mode, 4), 1) for mode in MODES},
        'model_work_ms_per_step': {mode: round(median(mode, 5), 1) for mode in MODES},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--resolutions', type=int, nargs='+', default=[32, 64])
    parser.add_argument('--inputs', nargs='+', choices=('images', 'latents'), default=['images', 'latents'])
    parser.add_argument('--rounds', type=int, default=5, help='Alternations of the three modes.')
    parser.add_argument('--steps', type=int, default=12, help='Timed steps per mode per round.')
    parser.add_argument('--threads', type=int, default=None, help="torch's intra-op threads (default: torch's).")
    parser.add_argument('--scratch', default=None, help='Folder for the pipeline and shards (default: a temp dir).')
    parser.add_argument('--json', default=None, help='Also write the results here.')
    args = parser.parse_args(argv)
    scratch = args.scratch or tempfile.mkdtemp(prefix='step_overhead_')
    os.makedirs(scratch, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}'
    )
    results = []
    print(
        '| px | inputs | (a) bare ms | (b) trainer ms | (c) full ms | (b)/(a) | (c)/(a) | CPU (b)/(a) | CPU (c)/(a) '
        '| (c) fetch ms | outside the model ms (a) / (b) / (c) | model work ms (a) / (b) / (c) '
        '| system ms (a) / (b) / (c) | minor faults (a) / (b) / (c) |'
    )
    print('|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|')
    for resolution in args.resolutions:
        for inputs in args.inputs:
            result = measure((resolution, inputs), args.rounds, args.steps, scratch)
            results.append(result)
            ms, ratio, cpu = result['ms_per_step'], result['ratio_to_bare'], result['cpu_ratio_to_bare']
            print(
                f'| {resolution} | {inputs} | {ms["bare"]} | {ms["trainer"]} | {ms["full"]} | '
                f'{ratio["trainer"]:.3f} | {ratio["full"]:.3f} | {cpu["trainer"]:.3f} | {cpu["full"]:.3f} | '
                f'{result["fetch_ms_per_step"]["full"]} | '
                f'{" / ".join(str(result["outside_model_ms_per_step"][mode]) for mode in MODES)} | '
                f'{" / ".join(str(result["model_work_ms_per_step"][mode]) for mode in MODES)} | '
                f'{" / ".join(str(result["system_ms_per_step"][mode]) for mode in MODES)} | '
                f'{" / ".join(str(result["minor_faults_per_step"][mode]) for mode in MODES)} |',
                flush=True,
            )
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=2)


if __name__ == '__main__':
    main()
