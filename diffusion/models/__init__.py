"""Composer models: one latent diffusion model composed of a denoiser, a text conditioner and an objective (SD2,
SDXL), the components' registries, and autoencoder training."""

from diffusion.models.adapters import Adapter, apply_adapters, merge_adapters
from diffusion.models.conditioners import CLIPTextConditioner, SDXLTextConditioner, TextConditioner
from diffusion.models.denoisers import Denoiser, UNetDenoiser
from diffusion.models.factories import (
    build_stable_diffusion,
    build_stable_diffusion_xl,
    latent_diffusion,
    stable_diffusion_2,
    stable_diffusion_xl,
    tiny_stable_diffusion,
    tiny_stable_diffusion_xl,
)
from diffusion.models.objectives import DDPMObjective, Objective
from diffusion.models.stable_diffusion import StableDiffusion, get_denoiser

__all__ = [
    'Adapter',
    'CLIPTextConditioner',
    'DDPMObjective',
    'Denoiser',
    'Objective',
    'SDXLTextConditioner',
    'StableDiffusion',
    'TextConditioner',
    'UNetDenoiser',
    'apply_adapters',
    'build_stable_diffusion',
    'build_stable_diffusion_xl',
    'get_denoiser',
    'latent_diffusion',
    'merge_adapters',
    'stable_diffusion_2',
    'stable_diffusion_xl',
    'tiny_stable_diffusion',
    'tiny_stable_diffusion_xl',
]
