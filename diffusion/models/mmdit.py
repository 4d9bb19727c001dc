"""The MMDiT denoiser of Stable Diffusion 3 (Esser et al., 2024): diffusers' ``SD3Transformer2DModel`` bound to the
:class:`~diffusion.models.denoisers.Denoiser` interface.

The network patchifies the latents (``patch_size`` x ``patch_size`` pixels of latent per token), runs joint
attention over image and text tokens in each ``JointTransformerBlock`` and takes the pooled text embedding with the
timestep through its AdaLN modulation. What this module adds is what the trainer asks of it: the conditioning
dict mapped to the network's arguments (``text_embeds`` -> ``encoder_hidden_states``, ``pooled_text_embeds`` ->
``pooled_projections``), FSDP units and activation checkpointing at the transformer blocks, the width checks against
the text conditioner, and the presets: the SD3-medium shape (2,028,328,000 parameters) and a CPU-sized one. FLOPs
are counted by :func:`~diffusion.models.denoisers.count_forward_flops` like the UNet's, so SpeedMonitor reports MFU.

The network sits on the model under ``transformer``, its name in diffusers' ``StableDiffusion3Pipeline``.
"""

from __future__ import annotations

import copy
from typing import Any, Collection, Optional

import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.attention import JointTransformerBlock
from torch import nn

from diffusion.models.denoisers import Denoiser
from diffusion.utils import ConfigError

__all__ = ['MMDIT_PRESETS', 'MMDiTDenoiser', 'SD3_MEDIUM_TRANSFORMER_CONFIG', 'TINY_MMDIT_CONFIG', 'mmdit']

# SD3-medium: 24 joint blocks of 24 heads x 64 (width 1536), T5-XXL's 4096-wide tokens, CLIP-L + CLIP-G pooled
# (768 + 1280 = 2048), 16-channel latents, 2x2 patches; positional embeddings for up to 192 x 192 patches.
SD3_MEDIUM_TRANSFORMER_CONFIG = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
)

# CPU size: two blocks of 2 heads x 8 on 8x8 latents (16 tokens); the tiny sd3 conditioner's widths (T5 48, pooled
# 16 + 16).
TINY_MMDIT_CONFIG = dict(
    sample_size=8,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=48,
    caption_projection_dim=16,
    pooled_projection_dim=32,
    pos_embed_max_size=16,
)

MMDIT_PRESETS = {'sd3_medium': SD3_MEDIUM_TRANSFORMER_CONFIG, 'tiny': TINY_MMDIT_CONFIG}


class MMDiTDenoiser(Denoiser):
    """A diffusers ``SD3Transformer2DModel``; see the module docstring.

    Conditioning: ``text_embeds`` (B, L, joint_attention_dim) are the text tokens of joint attention,
    ``pooled_text_embeds`` (B, pooled_projection_dim) joins the timestep embedding. FSDP units and activation
    checkpointing: each ``JointTransformerBlock``.
    """

    attribute = 'transformer'
    network_class = SD3Transformer2DModel

    @property
    def patch_size(self) -> int:
        """Latent pixels per token side: latent sizes must be multiples of it."""
        return int(self.config.patch_size)

    def __call__(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: dict) -> torch.Tensor:
        # Keyword arguments: the network's second positional argument is the text, not the timestep.
        return self.network(hidden_states=noisy_latents, timestep=timesteps, **self.network_kwargs(conditioning)).sample

    def network_kwargs(self, conditioning: dict) -> dict[str, Any]:
        return {
            'encoder_hidden_states': conditioning['text_embeds'],
            'pooled_projections': conditioning['pooled_text_embeds'],
        }

    def fsdp_units(self) -> list[nn.Module]:
        return list(self.network.transformer_blocks)

    @staticmethod
    def activation_checkpointing_fn(module: nn.Module) -> bool:
        return isinstance(module, JointTransformerBlock)

    def check_conditioning(self, shapes: dict[str, tuple[int, ...]]) -> None:
        config = self.config
        if 'pooled_text_embeds' not in shapes:
            raise ConfigError(
                'Invalid model.text_conditioner: the mmdit denoiser needs pooled text embeddings; use the sd3 '
                'conditioner (two CLIPs + T5).'
            )
        for key, field in (('text_embeds', 'joint_attention_dim'), ('pooled_text_embeds', 'pooled_projection_dim')):
            width, expected = shapes[key][-1], getattr(config, field)
            if width != expected:
                raise ConfigError(
                    f'Invalid model.denoiser.config.{field}={expected}: the text conditioner gives {key} {width} '
                    f'wide; set {field}: {width}.'
                )


def mmdit(
    config: Optional[dict] = None,
    *,
    preset: str = 'tiny',
    pretrained: Optional[str] = None,
    load: Collection[str] = (),
) -> MMDiTDenoiser:
    """An :class:`MMDiTDenoiser` built from a preset and ``config`` or loaded from ``pretrained``'s ``transformer``.

    Args:
        config (dict, optional): ``SD3Transformer2DModel`` arguments that override the preset's.
        preset (str): ``'tiny'`` (CPU) or ``'sd3_medium'`` (2.03B parameters). Default: ``'tiny'``.
        pretrained (str, optional): A diffusers SD3 pipeline folder or hub id; loaded with ``use_safetensors=True``.
        load (Collection[str]): The pipeline components to load from ``pretrained``; the network loads when it names
            ``transformer``.
    """
    if pretrained is not None and 'transformer' in load:
        network = SD3Transformer2DModel.from_pretrained(pretrained, subfolder='transformer', use_safetensors=True)
        return MMDiTDenoiser(network)
    if preset not in MMDIT_PRESETS:
        raise ConfigError(f'Invalid model.denoiser.preset={preset!r}: expected one of {", ".join(MMDIT_PRESETS)}.')
    merged = copy.deepcopy(MMDIT_PRESETS[preset])
    merged.update({k: tuple(v) if isinstance(v, list) else v for k, v in (config or {}).items()})
    return MMDiTDenoiser(SD3Transformer2DModel(**merged))
