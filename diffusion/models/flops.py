"""FLOP counts of the denoiser, for Composer's SpeedMonitor (which reports MFU when the model has
``flops_per_batch``) and for the benchmarks.

Counted with torch's ``FlopCounterMode`` on a copy of the UNet built on the meta device, so counting allocates no
weights and runs no kernels; matmuls and convolutions are counted, as in the reference figures (SD2 UNet: 181
GFLOP forward per image at 256 px, 804 at 512 px). A training step costs about three forward passes (the backward
pass computes gradients for both activations and weights).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['unet_forward_flops']


@functools.lru_cache(maxsize=32)
def _count(config_items: tuple, latent_shape: tuple[int, ...], text_shape: tuple[int, ...]) -> int:
    config = {key: list(value) if isinstance(value, tuple) else value for key, value in config_items}
    with torch.device('meta'):
        unet = UNet2DConditionModel.from_config(config)
        sample = torch.zeros(1, *latent_shape)
        timesteps = torch.zeros(1, dtype=torch.long)
        text = torch.zeros(1, *text_shape)
        added = None
        if config.get('addition_embed_type') == 'text_time':  # SDXL: pooled text + six size/crop numbers
            pooled = config['projection_class_embeddings_input_dim'] - 6 * config['addition_time_embed_dim']
            added = {'text_embeds': torch.zeros(1, pooled), 'time_ids': torch.zeros(1, 6)}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(sample, timesteps, encoder_hidden_states=text, added_cond_kwargs=added)
    return int(counter.get_total_flops())


def unet_forward_flops(config: Any, latent_shape: tuple[int, ...], text_shape: tuple[int, ...]) -> int:
    """Forward FLOPs of one sample (latents ``(C, H, W)``, text ``(L, D)``) through a UNet with ``config``."""
    items = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in dict(config).items()))
    return _count(items, tuple(latent_shape), tuple(text_shape))
