"""Composer models: the Stable Diffusion 2 family and autoencoder training."""

from diffusion.models.factories import build_stable_diffusion, stable_diffusion_2, tiny_stable_diffusion
from diffusion.models.stable_diffusion import StableDiffusion

__all__ = ['StableDiffusion', 'build_stable_diffusion', 'stable_diffusion_2', 'tiny_stable_diffusion']
