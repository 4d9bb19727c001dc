"""Composer callbacks: image logging, prompt-following evaluation, sample ledger, component export."""

from diffusion.callbacks.log_diffusion_images import LogDiffusionImages
from diffusion.callbacks.prompt_following import PromptFollowing
from diffusion.callbacks.sample_ledger import SampleLedger
from diffusion.callbacks.save_pretrained import SavePretrained

__all__ = ['LogDiffusionImages', 'PromptFollowing', 'SampleLedger', 'SavePretrained']
