"""Composer callbacks: image logging, prompt-following and image-metric (FID, KID, CLIP score) evaluation, sample
ledger, component export, NaN guard; and the file logger."""

from diffusion.callbacks.file_logger import FileLogger
from diffusion.callbacks.image_metrics import ImageMetrics
from diffusion.callbacks.log_diffusion_images import LogDiffusionImages
from diffusion.callbacks.nan_guard import NaNGuard
from diffusion.callbacks.prompt_following import PromptFollowing
from diffusion.callbacks.sample_ledger import SampleLedger
from diffusion.callbacks.save_pretrained import SavePretrained

__all__ = [
    'FileLogger',
    'ImageMetrics',
    'LogDiffusionImages',
    'NaNGuard',
    'PromptFollowing',
    'SampleLedger',
    'SavePretrained',
]
