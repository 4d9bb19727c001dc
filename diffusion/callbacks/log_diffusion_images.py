"""Periodically sample a fixed list of prompts with a fixed seed and log the grid.

Builds on Composer's ``Callback`` and ``Logger``: the grid goes to every configured logger through
``Logger.log_images`` (TensorBoard, W&B, MLflow, ...) and ``Logger.upload_file`` (object-store uploaders), and is
written as a PNG under ``folder`` so that a plain file logger's run has it too. Sampling uses the model's
``generate``; every rank samples (required when the UNet is sharded) and rank 0 writes.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from composer.core import Callback, State, Time, TimeUnit
from composer.loggers import Logger
from composer.utils import dist

from diffusion.callbacks.ema_weights import ema_weights
from diffusion.callbacks.image_grid import save_image_grid
from diffusion.utils import unwrap_model

__all__ = ['LogDiffusionImages']


class LogDiffusionImages(Callback):
    """Sample ``prompts`` every ``interval`` and at the end of training; log and save the grid.

    Args:
        prompts (Sequence[str]): Prompts to sample, in grid order.
        interval (str): How often, as a Composer time in batches or epochs (``'500ba'``, ``'1ep'``).
            Default: ``'1ep'``.
        folder (str): Where the PNG grids go, as ``<folder>/batch_<N>.png``. Default: ``'samples'``.
        seed (int): Seed of the initial noise, the same at every interval. Default: ``42``.
        guidance_scale (float): Classifier-free guidance scale. Default: ``7.5``.
        num_inference_steps (int): Sampler steps. Default: ``50``.
        height (int, optional): Image height; default: the model's native size.
        width (int, optional): Image width; default: the model's native size.
        scheduler (str, optional): Sampler name; default: the model's.
        negative_prompts (Sequence[str], optional): One per prompt, or none.
        use_ema (bool): Sample with the EMA weights when an ``ema`` algorithm has started. Default: ``True``.
    """

    def __init__(
        self,
        prompts: Sequence[str],
        interval: str = '1ep',
        folder: str = 'samples',
        seed: int = 42,
        guidance_scale: float = 7.5,
        num_inference_steps: int = 50,
        height: Optional[int] = None,
        width: Optional[int] = None,
        scheduler: Optional[str] = None,
        negative_prompts: Optional[Sequence[str]] = None,
        use_ema: bool = True,
    ):
        if not prompts:
            raise ValueError('LogDiffusionImages needs at least one prompt.')
        self.prompts = list(prompts)
        self.interval = Time.from_timestring(interval) if isinstance(interval, str) else interval
        if self.interval.unit not in (TimeUnit.BATCH, TimeUnit.EPOCH):
            raise ValueError(f'interval must be in batches or epochs (e.g. "100ba", "1ep"), got {interval!r}.')
        self.folder = folder
        self.seed = seed
        self.generate_kwargs = dict(
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            height=height,
            width=width,
            scheduler=scheduler,
            negative_prompts=list(negative_prompts) if negative_prompts else None,
        )
        self.use_ema = use_ema
        self._last_logged_batch = -1

    def batch_end(self, state: State, logger: Logger) -> None:
        if self.interval.unit == TimeUnit.BATCH and int(state.timestamp.batch) % self.interval.value == 0:
            self._log(state, logger)

    def epoch_end(self, state: State, logger: Logger) -> None:
        if self.interval.unit == TimeUnit.EPOCH and int(state.timestamp.epoch) % self.interval.value == 0:
            self._log(state, logger)

    def fit_end(self, state: State, logger: Logger) -> None:
        self._log(state, logger)

    def _log(self, state: State, logger: Logger) -> None:
        batch = int(state.timestamp.batch)
        if batch == self._last_logged_batch:
            return
        self._last_logged_batch = batch
        with ema_weights(state, self.use_ema):
            images = unwrap_model(state.model).generate(self.prompts, seed=self.seed, **self.generate_kwargs)
        logger.log_images(images, name='samples', step=batch)
        if dist.get_global_rank() == 0:
            path = save_image_grid(images, os.path.join(self.folder, f'batch_{batch:07d}.png'))
            logger.upload_file(
                remote_file_name=f'{state.run_name}/samples/{os.path.basename(path)}', file_path=path, overwrite=True
            )
