"""Find the parts of a diffusion model that the algorithms change."""

from __future__ import annotations

import torch
from diffusers import ModelMixin

from diffusion.utils import unwrap_model


def get_unet(model: torch.nn.Module, algorithm: str) -> ModelMixin:
    """The diffusers denoiser at ``model.unet`` (through a DDP wrapper), or ``model`` itself if it is one.

    Args:
        model (torch.nn.Module): A :class:`~diffusion.models.StableDiffusion` or a bare diffusers UNet.
        algorithm (str): Name of the calling algorithm, for the error message.
    """
    model = unwrap_model(model)
    unet = model if isinstance(model, ModelMixin) else getattr(model, 'unet', None)
    if not isinstance(unet, ModelMixin):
        raise ValueError(
            f'{algorithm} needs a model with a diffusers `unet` submodule; got {type(model).__name__} '
            f'whose `unet` is {type(unet).__name__}.'
        )
    return unet
