"""Composer callbacks: image logging, prompt-following evaluation, sample ledger, component export, NaN guard."""

from diffusion.callbacks.log_diffusion_images import LogDiffusionImages
from diffusion.callbacks.nan_guard import NaNGuard
from diffusion.callbacks.prompt_following import PromptFollowing
from diffusion.callbacks.sample_ledger import SampleLedger
from diffusion.callbacks.save_pretrained import SavePretrained

__all__ = ['LogDiffusionImages', 'NaNGuard', 'PromptFollowing', 'SampleLedger', 'SavePretrained']
