"""FID, KID and CLIP score during training, sampled on every rank and synchronised like the standalone command.

Builds on Composer's ``Callback`` and interval scheduler (``'1000ba'``, ``'1ep'``, ``'0.25dur'``; always at the end
of training too) and on :class:`~diffusion.evaluation.image_metrics.GenerationMetrics` (torchmetrics' FID, KID and
CLIP score). Rank ``r`` of ``W`` samples prompts ``i`` with ``i % W == r`` and extracts reference images the same
way, so no rank idles while another samples (a rank left waiting in a collective is what stalls peer trainers
into NCCL timeouts); every rank runs the same number of ``generate`` calls (a rank short of prompts samples one
throw-away image), as FSDP needs. Prompt ``i`` is sampled with seed ``seed + i``, one generator per image, so the
images, and hence the metrics, do not depend on the number of ranks. Images are quantised to uint8 before the
metrics see them, exactly as the optional PNGs are written (``save_folder``, in the sampling command's layout), so
``python -m diffusion.evaluation.metrics`` on those PNGs gives the logged values.

Logs ``metrics/fid``, ``metrics/kid_mean``, ``metrics/kid_std``, ``metrics/clip_score`` and ``metrics/num_images``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any, Optional, Union

import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import create_interval_scheduler, dist
from PIL import Image
from torch import nn
from tqdm import tqdm

from diffusion.callbacks.ema_weights import ema_weights
from diffusion.evaluation.image_metrics import (
    METRIC_NAMES,
    GenerationMetrics,
    open_reference,
    to_uint8,
    update_from_source,
)
from diffusion.evaluation.prompts import PromptRecord, load_prompt_records
from diffusion.evaluation.sample_folder import SAMPLES_FILE, image_filename
from diffusion.utils import unwrap_model

__all__ = ['ImageMetrics']


class ImageMetrics(Callback):
    """Automatic image metrics of samples from the model being trained.

    Args:
        prompts (str | Sequence[str]): A prompt set (file or built-in name, see
            :func:`~diffusion.evaluation.prompts.load_prompt_records`) or a list of prompts. Default: ``'demo'``.
        reference (str, optional): Reference images for FID and KID: a folder, or a local MDS dataset such as the
            training shards; for COCO captions, the folder of the captioned images (only those are used).
        metrics (Sequence[str]): Any of ``'fid'``, ``'kid'``, ``'clip_score'``. Default: all three.
        interval (str, optional): Also evaluate at this interval (``'1000ba'``, ``'1ep'``); always at fit end.
        inception_weights (str, optional): torch-fidelity's InceptionV3 weights for FID/KID as a ``.safetensors``
            file (:func:`~diffusion.evaluation.image_metrics.convert_inception`); a pickled ``.pth`` is refused.
        feature_extractor (nn.Module | str, optional): Another FID/KID extractor, uint8 (N, 3, H, W) -> (N, D): a
            module or a TorchScript file.
        clip_model (str, optional): ``CLIPModel`` + ``CLIPProcessor`` folder for the CLIP score.
        num_prompts (int, optional): Use the first ``num_prompts`` prompts. Default: all.
        num_reference (int, optional): Use the first ``num_reference`` reference images. Default: all.
        num_inference_steps (int): Sampler steps. Default: ``50``.
        guidance_scale (float): Classifier-free guidance scale. Default: ``7.5``.
        seed (int): Prompt ``i`` is sampled with seed ``seed + i``. Default: ``0``.
        batch_size (int): Prompts sampled at once per rank; also the feature batch. Default: ``8``.
        resolution (int, optional): Sample at this size, and resize reference images to it. Default: the model's
            sample size.
        scheduler (str, optional): Sampler name; default: the model's.
        negative_prompt (str, optional): Negative prompt for every image.
        reference_column (str): Image column of an MDS reference. Default: ``'image'``.
        kid_subsets (int): KID subsets. Default: ``100``.
        kid_subset_size (int): Images per KID subset (clamped to the image count). Default: ``1000``.
        save_folder (str, optional): Write each evaluation's images to ``{save_folder}/batch_{batch:07d}/`` with
            ``samples.jsonl`` and ``metrics.json`` (a folder every rank can write to).
        use_ema (bool): Sample with the EMA weights once an ``ema`` algorithm has started. Default: ``True``.
        progress_bar (bool): Show progress bars on rank 0. Default: ``False``.
    """

    def __init__(
        self,
        prompts: Union[str, Sequence[str]] = 'demo',
        reference: Optional[str] = None,
        metrics: Sequence[str] = METRIC_NAMES,
        interval: Optional[str] = None,
        inception_weights: Optional[str] = None,
        feature_extractor: Union[nn.Module, str, None] = None,
        clip_model: Optional[str] = None,
        num_prompts: Optional[int] = None,
        num_reference: Optional[int] = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        seed: int = 0,
        batch_size: int = 8,
        resolution: Optional[int] = None,
        scheduler: Optional[str] = None,
        negative_prompt: Optional[str] = None,
        reference_column: str = 'image',
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        save_folder: Optional[str] = None,
        use_ema: bool = True,
        progress_bar: bool = False,
    ):
        if isinstance(prompts, str):
            self.records = load_prompt_records(prompts, limit=num_prompts)
        else:
            self.records = [PromptRecord(prompt) for prompt in list(prompts)[:num_prompts]]
            if not self.records:
                raise ValueError('prompts is an empty list.')
        self.prompts = [record.prompt for record in self.records]
        self.metrics = GenerationMetrics(
            metrics,
            feature_extractor=feature_extractor,
            inception_weights=inception_weights,
            clip_model=clip_model,
            kid_subsets=kid_subsets,
            kid_subset_size=kid_subset_size,
        )
        self.reference = None
        if self.metrics.needs_reference:
            if reference is None:
                raise ValueError('fid and kid need reference images: a folder or a local MDS dataset.')
            files = [record.reference for record in self.records if record.reference is not None] or None
            self.reference = open_reference(reference, files, column=reference_column)
        self.num_reference = len(self.reference) if self.reference is not None else 0
        if num_reference is not None:
            self.num_reference = min(self.num_reference, num_reference)
        self.check_interval = None
        if interval is not None:
            self.check_interval = create_interval_scheduler(
                interval, include_end_of_training=True, checkpoint_events=False, final_events={Event.BATCH_END}
            )
        self.generate_kwargs: dict[str, Any] = dict(
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            scheduler=scheduler,
            height=resolution,
            width=resolution,
        )
        self.negative_prompt = negative_prompt
        self.seed = seed
        self.batch_size = batch_size
        self.resolution = resolution
        self.save_folder = save_folder
        self.use_ema = use_ema
        self.progress_bar = progress_bar
        self.last_result: Optional[dict[str, float]] = None
        self._last_batch: Optional[int] = None

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event in (Event.BATCH_END, Event.EPOCH_END) and self.check_interval is not None:
            if self.check_interval(state, event) and self._last_batch != int(state.timestamp.batch):
                self.evaluate(state, logger)
        elif event == Event.FIT_END and self._last_batch != int(state.timestamp.batch):
            self.evaluate(state, logger)

    def _check_world_size(self, world_size: int) -> None:
        # Every rank must hold images of each kind: torchmetrics gathers one tensor per state from every rank.
        if len(self.prompts) < world_size:
            raise ValueError(f'{len(self.prompts)} prompts cannot be shared by {world_size} ranks; use more prompts.')
        if self.metrics.needs_reference and self.num_reference < world_size:
            raise ValueError(f'{self.num_reference} reference images cannot be shared by {world_size} ranks.')

    @torch.no_grad()
    def sample(self, model: Any, indices: Sequence[int], num_batches: int) -> Iterator[tuple[list[int], torch.Tensor]]:
        """Yields (prompt indices, uint8 images (B, 3, H, W)) for ``indices`` in ``num_batches`` ``generate`` calls."""
        show = self.progress_bar and dist.get_global_rank() == 0
        for number in tqdm(range(num_batches), desc='sampling for metrics', disable=not show, leave=False):
            batch = list(indices[number * self.batch_size : (number + 1) * self.batch_size])
            # A rank out of prompts still calls generate, so that FSDP's collectives line up; the image is dropped.
            prompts = [self.prompts[i] for i in batch] or self.prompts[:1]
            seeds = [self.seed + i for i in batch] or [self.seed]
            negative = None if self.negative_prompt is None else [self.negative_prompt] * len(prompts)
            images = model.generate(prompts, negative_prompts=negative, seed=seeds, **self.generate_kwargs)
            if batch:
                yield batch, to_uint8(images)

    def evaluate(self, state: State, logger: Logger) -> dict[str, float]:
        """Sample this rank's share of the prompts, update the metrics, compute them over all ranks and log."""
        rank, world_size = dist.get_global_rank(), dist.get_world_size()
        self._check_world_size(world_size)
        self._last_batch = batch = int(state.timestamp.batch)
        self.metrics.to(state.device.tensor_to_device(torch.empty(0)).device)
        folder = None if self.save_folder is None else os.path.join(self.save_folder, f'batch_{batch:07d}')
        indices = list(range(rank, len(self.prompts), world_size))
        num_batches = math.ceil(math.ceil(len(self.prompts) / world_size) / self.batch_size)
        rows, size = [], self.resolution
        with ema_weights(state, self.use_ema) as on_ema:
            # Batch by batch: no rank holds all its images.
            for chunk, images in self.sample(unwrap_model(state.model), indices, num_batches):
                self.metrics.update_generated(images, [self.prompts[i] for i in chunk], torch.tensor(chunk))
                size = size or images.shape[-1]
                if folder is not None:
                    rows += self._save_images(folder, chunk, images)
        if self.metrics.needs_reference and not self.metrics.has_reference:
            shard = range(rank, self.num_reference, world_size)
            update_from_source(self.metrics, self.reference, shard, True, size, self.batch_size, progress=False)
        result = self.metrics.compute()  # collective: every rank computes the same values
        self.metrics.reset_generated()
        logger.log_metrics({f'metrics/{name}': value for name, value in result.items() if name != 'num_reference'})
        self.last_result = result
        if folder is not None:
            self._write_index(folder, rows, {**result, 'resolution': size}, on_ema)
        if rank == 0:
            values = ' '.join(f'{name}={value:.6g}' for name, value in result.items())
            print(f'image_metrics batch {batch}: {values}', flush=True)
        return result

    def _save_images(self, folder: str, indices: list[int], images: torch.Tensor) -> list[dict]:
        """PNGs named as the sampling command names them; returns their samples.jsonl rows."""
        os.makedirs(folder, exist_ok=True)
        rows = []
        for index, image in zip(indices, images.cpu()):
            name = image_filename(index, self.seed + index)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(os.path.join(folder, name))
            rows.append({'file': name, 'prompt_index': index, 'prompt': self.prompts[index], 'seed': self.seed + index})
        return rows

    def _write_index(self, folder: str, rows: list[dict], result: dict, on_ema: bool) -> None:
        """Rank 0 writes samples.jsonl (every rank's rows) and metrics.json."""
        all_rows = sorted(
            (row for rank_rows in dist.all_gather_object(rows) for row in rank_rows), key=lambda r: r['prompt_index']
        )
        if dist.get_global_rank() == 0:
            settings = {**self.generate_kwargs, 'negative_prompt': self.negative_prompt, 'ema_weights': on_ema}
            with open(os.path.join(folder, SAMPLES_FILE), 'w', encoding='utf-8') as f:
                f.writelines(json.dumps({**row, **settings}) + '\n' for row in all_rows)
            with open(os.path.join(folder, 'metrics.json'), 'w') as f:
                json.dump({**result, **settings}, f, indent=2)
        dist.barrier()  # the folder is complete on every rank's return
