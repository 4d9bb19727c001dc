"""Activation (gradient) checkpointing of the denoiser: keep each block's input, recompute the rest in the backward.

Turns on diffusers' ``enable_gradient_checkpointing`` of the denoising network, which runs its resnet and
transformer blocks
under ``torch.utils.checkpoint`` (non-reentrant): a block's intermediate activations are freed after the forward
and recomputed during the backward. Trades about 30% more compute (one extra UNet forward per step, where forward
plus backward cost about three forwards) for activation memory, so that a larger microbatch fits on a device.
Losses and gradients do not change (the recomputation restores the RNG state).

Has no effect without gradients (under ``torch.no_grad``, as in evaluation and sampling, nothing is kept), and
none on the VAE and text encoder, which are not checkpointed (frozen, they keep no activations for a backward
anyway; a trained text encoder would be the one case to add).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger

from diffusion.models import get_denoiser

log = logging.getLogger(__name__)

__all__ = ['GradientCheckpointing', 'apply_gradient_checkpointing']


def apply_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Turn on gradient checkpointing in the denoiser of ``model``.

    Args:
        model (torch.nn.Module): A :class:`~diffusion.models.StableDiffusion`.

    Raises:
        ValueError: If the model has no denoiser, or its network does not support gradient checkpointing.
    """
    denoiser = get_denoiser(model, 'GradientCheckpointing')
    denoiser.enable_gradient_checkpointing()
    log.info(f'Enabled gradient checkpointing in {type(denoiser.network).__name__}.')


class GradientCheckpointing(Algorithm):
    """Turn on the denoiser's gradient checkpointing at ``Event.INIT``; see :func:`apply_gradient_checkpointing`.

    Example yaml: ``algorithms: {gradient_checkpointing: {}}``.
    """

    def __init__(self) -> None:
        # Composer's Algorithm.__init__ takes **kwargs; an explicit signature lets the registry reject config keys.
        super().__init__()

    def match(self, event: Event, state: State) -> bool:
        return event == Event.INIT

    def apply(self, event: Event, state: State, logger: Logger) -> Optional[int]:
        apply_gradient_checkpointing(state.model)
