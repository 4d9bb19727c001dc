"""Shared set-up of tests/callbacks/test_image_metrics.py, and its two-rank worker (run under ``composer -n 2``).

``evaluate_tiny(assets, save_folder)`` builds the seeded tiny model and an :class:`ImageMetrics` on the test's assets
(reference PNGs, TorchScript extractor, tiny CLIP) and evaluates once through a real Composer ``State`` and
``Logger``. Run as a script, each rank does that and writes its result and logged metrics to
``<out>/rank<r>.json``.
"""

import json
import os
import sys
from typing import Any

import torch
from composer.core import State
from composer.devices import DeviceCPU
from composer.loggers import InMemoryLogger, Logger

from diffusion.callbacks.image_metrics import ImageMetrics

# Five prompts on two ranks in batches of two: rank 1 runs a throw-away batch to match rank 0's two calls.
SETTINGS = dict(
    prompts='demo',
    num_prompts=5,
    num_inference_steps=2,
    guidance_scale=5.0,
    seed=11,
    batch_size=2,
    resolution=32,
    kid_subsets=4,
    kid_subset_size=4,
)


def harness(model: Any) -> tuple[State, Logger, InMemoryLogger]:
    """A Composer State and Logger around ``model``, as the Trainer would pass them, without training."""
    state = State(model=model, rank_zero_seed=0, run_name='image-metrics-test', device=DeviceCPU())
    memory = InMemoryLogger()
    logger = Logger(state, destinations=[memory])
    memory.init(state, logger)
    return state, logger, memory


def evaluate_tiny(assets: dict, save_folder: str, **overrides: Any) -> tuple[dict, dict, ImageMetrics]:
    """One evaluation of the seeded tiny model; returns the result, the logged metrics and the callback."""
    from tests.conftest import build_tiny_sd

    torch.manual_seed(0)  # the same weights on every rank and in every process
    model = build_tiny_sd()
    callback = ImageMetrics(
        reference=assets['reference'],
        feature_extractor=assets['extractor'],
        clip_model=assets['clip'],
        save_folder=save_folder,
        **{**SETTINGS, **overrides},
    )
    state, logger, memory = harness(model)
    result = callback.evaluate(state, logger)
    logged = {name: values[-1][1] for name, values in memory.data.items() if name.startswith('metrics/')}
    return result, logged, callback


def main() -> None:
    from composer.utils import dist

    out, reference, extractor, clip = sys.argv[1:]
    dist.initialize_dist(DeviceCPU())
    assets = dict(reference=reference, extractor=extractor, clip=clip)
    result, logged, _ = evaluate_tiny(assets, os.path.join(out, 'images'))
    with open(os.path.join(out, f'rank{dist.get_global_rank()}.json'), 'w') as f:
        json.dump({'result': result, 'logged': logged}, f)


if __name__ == '__main__':
    main()
