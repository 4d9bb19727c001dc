"""Composer algorithms for diffusion models: attention kernel, gradient checkpointing, denoiser compilation, EMA that
works with FSDP."""

from diffusion.algorithms.attention_backend import ATTENTION_BACKENDS, AttentionBackend, apply_attention_backend
from diffusion.algorithms.compile_denoiser import CompileDenoiser, apply_compile_denoiser
from diffusion.algorithms.gradient_checkpointing import GradientCheckpointing, apply_gradient_checkpointing
from diffusion.algorithms.sharded_ema import ShardedEMA

__all__ = [
    'ATTENTION_BACKENDS',
    'AttentionBackend',
    'CompileDenoiser',
    'GradientCheckpointing',
    'ShardedEMA',
    'apply_attention_backend',
    'apply_compile_denoiser',
    'apply_gradient_checkpointing',
]
