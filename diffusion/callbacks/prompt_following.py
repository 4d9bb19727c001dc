"""Score how well generated images follow their prompts' colour and shape, during or after training.

Builds on Composer's ``Callback``: at the end of training (and every ``interval`` if set) it samples each prompt
of a prompt file with fixed seeds through the model's ``generate``, scores the images with the deterministic
checker of :mod:`diffusion.evaluation.prompt_following`, logs ``prompt_following/color`` and
``prompt_following/shape`` to every logger, writes the sample grid (``samples.png``) and a JSON report, and
prints ``prompt_following_color: <score>`` as a plain line.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from composer.core import Callback, State, Time, TimeUnit
from composer.loggers import Logger
from composer.utils import dist

from diffusion.callbacks.ema_weights import ema_weights
from diffusion.callbacks.image_grid import save_image_grid
from diffusion.evaluation.prompt_following import DEMO_PROMPTS_PATH, load_prompts, score_prompt_following
from diffusion.utils import unwrap_model

__all__ = ['PromptFollowing']


class PromptFollowing(Callback):
    """Prompt-following evaluation of colour and shape on a prompt file.

    Args:
        prompts_file (str): Prompt file, one per line. Default: the demo prompts shipped with the package.
        seeds (Sequence[int]): Each prompt is sampled once per seed. Default: ``(0, 1)``.
        folder (str): Where ``samples.png`` (the last grid) and ``results_filename`` go. Default: ``'.'``.
        results_filename (str): JSON report file name. Default: ``'demo_results.json'``.
        interval (str, optional): Also evaluate every this many batches (``'500ba'``); at fit end always.
        guidance_scale (float): Classifier-free guidance scale. Default: ``5.0``.
        num_inference_steps (int): Sampler steps. Default: ``30``.
        scheduler (str, optional): Sampler name; default: the model's.
        batch_size (int): Prompts sampled at once. Default: ``32``.
        grid_columns (int, optional): Images per row of the grid, which holds every seed of a prompt side by side
            (the demo uses 6: three shapes of one colour, two seeds each). Default: about the square root.
        use_ema (bool): Sample with the EMA weights when an ``ema`` algorithm has started. Default: ``True``.
    """

    def __init__(
        self,
        prompts_file: str = DEMO_PROMPTS_PATH,
        seeds: tuple[int, ...] = (0, 1),
        folder: str = '.',
        results_filename: str = 'demo_results.json',
        interval: Optional[str] = None,
        guidance_scale: float = 5.0,
        num_inference_steps: int = 30,
        scheduler: Optional[str] = None,
        batch_size: int = 32,
        grid_columns: Optional[int] = None,
        use_ema: bool = True,
    ):
        self.prompts = load_prompts(prompts_file)
        if not self.prompts:
            raise ValueError(f'No prompts in {prompts_file}.')
        self.seeds = list(seeds)
        self.folder = folder
        self.results_filename = results_filename
        self.interval = Time.from_timestring(interval) if interval else None
        if self.interval is not None and self.interval.unit != TimeUnit.BATCH:
            raise ValueError(f'interval must be in batches (e.g. "500ba"), got {interval!r}.')
        self.generate_kwargs = dict(
            guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, scheduler=scheduler
        )
        self.batch_size = batch_size
        self.grid_columns = grid_columns
        self.use_ema = use_ema
        self.last_result: Optional[dict] = None
        # (batch, images, prompts) of the last evaluation: fit end at a batch the interval just scored reuses them
        # instead of sampling the same weights again.
        self._last_sampled: Optional[tuple[int, torch.Tensor, list[str]]] = None

    def batch_end(self, state: State, logger: Logger) -> None:
        if self.interval is not None and int(state.timestamp.batch) % self.interval.value == 0:
            self.evaluate(state, logger)

    def fit_end(self, state: State, logger: Logger) -> None:
        self.evaluate(state, logger, final=True)

    def sample(self, model) -> tuple[torch.Tensor, list[str]]:
        """Images (P * S, 3, H, W) for every prompt and seed, prompt-major, and the matching prompt list."""
        per_seed = []
        for seed in self.seeds:
            chunks = []
            for start in range(0, len(self.prompts), self.batch_size):
                chunk = self.prompts[start : start + self.batch_size]
                chunks.append(model.generate(chunk, seed=seed * 100_003 + start, **self.generate_kwargs))
            per_seed.append(torch.cat(chunks))
        images = torch.stack(per_seed, dim=1).flatten(0, 1)  # (P, S, ...) -> P * S, seeds of a prompt adjacent
        prompts = [prompt for prompt in self.prompts for _ in self.seeds]
        return images, prompts

    def evaluate(self, state: State, logger: Logger, final: bool = False) -> dict:
        batch = int(state.timestamp.batch)
        if final and self._last_sampled is not None and self._last_sampled[0] == batch:
            _, images, prompts = self._last_sampled  # scored at this batch already
            result = self.last_result
        else:
            with ema_weights(state, self.use_ema) as on_ema:
                images, prompts = self.sample(unwrap_model(state.model))
            result = {**score_prompt_following(images.cpu(), prompts), 'ema_weights': on_ema}
            self._last_sampled = (batch, images, prompts)
        logger.log_metrics({'prompt_following/color': result['color'], 'prompt_following/shape': result['shape']})
        self.last_result = result
        if dist.get_global_rank() == 0:
            grid_name = 'samples.png' if final else f'samples_batch_{batch:07d}.png'
            save_image_grid(images, os.path.join(self.folder, grid_name), nrow=self.grid_columns)
            report = {'batch': batch, 'num_images': len(prompts), 'seeds': self.seeds, **self.generate_kwargs, **result}
            path = os.path.join(self.folder, self.results_filename)
            with open(path + '.tmp', 'w') as f:
                json.dump(report, f, indent=2)
            os.replace(path + '.tmp', path)
            print(f'prompt_following_color: {result["color"]:.2f}', flush=True)
            print(f'prompt_following_shape: {result["shape"]:.2f}', flush=True)
        return result
