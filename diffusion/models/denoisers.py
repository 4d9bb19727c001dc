"""Denoisers: the network a diffusion model trains, and what the code around it may ask of it.

A :class:`Denoiser` wraps a diffusers network (``UNet2DConditionModel`` now; ``SD3Transformer2DModel`` next) and
answers every question that algorithms, parallelism, precompute, sampling, the model card and export have about
it, so that none of them names the network's attribute or its block names:

- ``denoiser(noisy_latents, timesteps, conditioning)``: the prediction, with the conditioning dict of a
  :class:`~diffusion.models.conditioners.TextConditioner` mapped to the network's own arguments;
- :meth:`~Denoiser.fsdp_units` and :meth:`~Denoiser.activation_checkpointing_fn`: what FSDP wraps and checkpoints;
- :meth:`~Denoiser.forward_flops`: FLOPs per sample at a latent size (torch's ``FlopCounterMode`` on a copy built
  on the meta device, so counting allocates no weights), for SpeedMonitor's MFU;
- :attr:`~Denoiser.sample_size`, :attr:`~Denoiser.in_channels`: the native latent size and channels;
- :meth:`~Denoiser.enable_gradient_checkpointing`, :meth:`~Denoiser.compile`.

The model holds the network under :attr:`Denoiser.attribute` (``unet``: the diffusers pipeline's component name, so
checkpoints keep their keys) and :attr:`StableDiffusion.denoiser` binds a :class:`Denoiser` to whatever module sits
there now, including the FSDP wrapper Composer puts in its place. A new backbone is a subclass here plus a line in
:data:`diffusion.models.registries.denoisers`.
"""

from __future__ import annotations

import functools
from typing import Any, Collection, Optional

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['Denoiser', 'UNetDenoiser', 'count_forward_flops']


class Denoiser:
    """Interface of a denoiser bound to its network; see the module docstring.

    Args:
        network (nn.Module): The diffusers network (or the wrapper that now stands in its place).
    """

    #: Attribute of the model, and component name in the diffusers pipeline, that holds the network.
    attribute: str = ''
    #: The diffusers class of the network, for building it from a config and checking loaded weights.
    network_class: type = nn.Module

    def __init__(self, network: nn.Module):
        self.network = network

    @property
    def config(self) -> Any:
        """The network's diffusers config."""
        return self.network.config

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def sample_size(self) -> int:
        """The native latent side length (the pipeline's default image is this times the autoencoder factor)."""
        return int(self.config.sample_size)

    @property
    def in_channels(self) -> int:
        return int(self.config.in_channels)

    def __call__(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: dict) -> torch.Tensor:
        """The prediction (B, C, h, w) for ``noisy_latents`` at ``timesteps`` under ``conditioning``."""
        return self.network(noisy_latents, timesteps, **self.network_kwargs(conditioning)).sample

    def network_kwargs(self, conditioning: dict) -> dict[str, Any]:
        """The network's keyword arguments for a conditioning dict."""
        raise NotImplementedError

    def fsdp_units(self) -> list[nn.Module]:
        """Submodules that become their own FSDP unit (so only one unit's full weights are gathered at a time)."""
        raise NotImplementedError

    @staticmethod
    def activation_checkpointing_fn(module: nn.Module) -> bool:
        """Whether FSDP's activation checkpointing wraps ``module``."""
        raise NotImplementedError

    def check_conditioning(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Fail early, naming the config key, when a conditioner's per-sample shapes do not fit the network."""
        raise NotImplementedError

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in the backward pass (diffusers' own switch)."""
        if not getattr(self.network, '_supports_gradient_checkpointing', False):
            raise ValueError(f'{type(self.network).__name__} does not support gradient checkpointing.')
        self.network.enable_gradient_checkpointing()

    def compile(self, **compile_kwargs: Any) -> None:
        """``torch.compile`` the network in place (parameter names and checkpoints unchanged)."""
        self.network.compile(**compile_kwargs)

    def forward_flops(self, latent_shape: tuple[int, ...], conditioning_shapes: dict[str, tuple[int, ...]]) -> int:
        """Forward FLOPs of one sample with latents ``(C, h, w)`` and conditioning of the given per-sample shapes."""
        config = dict(self.config)
        items = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in config.items()))
        shapes = tuple(sorted((k, tuple(v)) for k, v in conditioning_shapes.items()))
        return count_forward_flops(type(self), items, tuple(latent_shape), shapes)


@functools.lru_cache(maxsize=32)
def count_forward_flops(denoiser_class: type, config_items: tuple, latent_shape: tuple, shapes: tuple) -> int:
    """FLOPs of one forward pass of ``denoiser_class``'s network built from ``config_items`` on the meta device."""
    config = {key: list(value) if isinstance(value, tuple) else value for key, value in config_items}
    with torch.device('meta'):
        denoiser = denoiser_class(denoiser_class.network_class.from_config(config))
        latents = torch.zeros(1, *latent_shape)
        timesteps = torch.zeros(1, dtype=torch.long)
        conditioning = {key: torch.zeros(1, *shape) for key, shape in shapes}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        denoiser(latents, timesteps, conditioning)
    return int(counter.get_total_flops())


class UNetDenoiser(Denoiser):
    """A diffusers ``UNet2DConditionModel`` (SD1/SD2; SDXL with ``addition_embed_type='text_time'``).

    Conditioning: ``text_embeds`` is the cross-attention context; SDXL's ``pooled_text_embeds`` and ``time_ids`` go
    to the added time embedding. FSDP units: each down block, the mid block and each up block (about 10 for SD2);
    activation checkpointing covers transformer and ResNet blocks.
    """

    attribute = 'unet'
    network_class = UNet2DConditionModel

    def network_kwargs(self, conditioning: dict) -> dict[str, Any]:
        kwargs: dict[str, Any] = {'encoder_hidden_states': conditioning['text_embeds']}
        if 'pooled_text_embeds' in conditioning:
            kwargs['added_cond_kwargs'] = {
                'text_embeds': conditioning['pooled_text_embeds'],
                'time_ids': conditioning['time_ids'],
            }
        return kwargs

    def fsdp_units(self) -> list[nn.Module]:
        network = self.network
        blocks = [*network.down_blocks, network.mid_block, *network.up_blocks]
        return [block for block in blocks if block is not None]

    @staticmethod
    def activation_checkpointing_fn(module: nn.Module) -> bool:
        return isinstance(module, (BasicTransformerBlock, ResnetBlock2D))

    def check_conditioning(self, shapes: dict[str, tuple[int, ...]]) -> None:
        config = self.config
        context_dim = shapes['text_embeds'][-1]
        pooled_dim = shapes['pooled_text_embeds'][-1] if 'pooled_text_embeds' in shapes else None
        if context_dim != config.cross_attention_dim:
            raise ValueError(
                f'Text embedding width {context_dim} != UNet cross_attention_dim {config.cross_attention_dim}; '
                'set unet_config.cross_attention_dim to match.'
            )
        text_time = getattr(config, 'addition_embed_type', None) == 'text_time'
        if pooled_dim is None and text_time:
            raise ValueError("A UNet with addition_embed_type='text_time' needs a conditioner with pooled embeddings.")
        if pooled_dim is not None:
            if not text_time:
                raise ValueError(
                    f"SDXL conditioning needs a UNet with addition_embed_type='text_time', got "
                    f'{config.addition_embed_type!r}.'
                )
            expected = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            if pooled_dim != expected:
                raise ValueError(
                    f'UNet projection_class_embeddings_input_dim {config.projection_class_embeddings_input_dim} '
                    f'must be the pooled embedding width ({pooled_dim}) + 6 x addition_time_embed_dim '
                    f'({config.addition_time_embed_dim}).'
                )


def unet(
    config: Optional[dict] = None, *, pretrained: Optional[str] = None, load: Collection[str] = ()
) -> UNetDenoiser:
    """A :class:`UNetDenoiser` built from ``config`` or loaded from the ``unet`` folder of ``pretrained``.

    Args:
        config (dict, optional): ``UNet2DConditionModel`` arguments, when the UNet is not loaded.
        pretrained (str, optional): A diffusers pipeline folder or hub id; loaded with ``use_safetensors=True``, so a
            pickled ``.bin`` (which runs code when loaded) is refused.
        load (Collection[str]): The pipeline components to load from ``pretrained``; the UNet loads when it names
            ``unet``.
    """
    if pretrained is not None and 'unet' in load:
        return UNetDenoiser(UNet2DConditionModel.from_pretrained(pretrained, subfolder='unet', use_safetensors=True))
    if config is None:
        raise ValueError('The unet denoiser needs `config` (UNet2DConditionModel arguments) or a pretrained folder.')
    return UNetDenoiser(UNet2DConditionModel(**config))
