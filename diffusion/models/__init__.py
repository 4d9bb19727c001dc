"""Composer models: the Stable Diffusion 2 family, the SDXL architecture and autoencoder training."""

from diffusion.models.factories import (
    build_stable_diffusion,
    build_stable_diffusion_xl,
    stable_diffusion_2,
    stable_diffusion_xl,
    tiny_stable_diffusion,
    tiny_stable_diffusion_xl,
)
from diffusion.models.stable_diffusion import StableDiffusion
from diffusion.models.stable_diffusion_xl import StableDiffusionXL

__all__ = [
    'StableDiffusion',
    'StableDiffusionXL',
    'build_stable_diffusion',
    'build_stable_diffusion_xl',
    'stable_diffusion_2',
    'stable_diffusion_xl',
    'tiny_stable_diffusion',
    'tiny_stable_diffusion_xl',
]
