"""The SDXL architecture (CommonCanvas-XL) as a subclass of the SD2-family model.

What is the same as SD2 is inherited from :class:`~diffusion.models.stable_diffusion.StableDiffusion`: the VAE
path and the one place latents are scaled, the noise and its targets, min-SNR weighting, offset noise, fixed-noise
validation, EMA, sampling through a diffusers pipeline and export. What differs is overridden here:

- **Two text encoders.** CLIP ViT-L/14 (``text_encoder``, a transformers ``CLIPTextModel``) and OpenCLIP
  ViT-bigG/14 with its projection (``text_encoder_2``, ``CLIPTextModelWithProjection``). The penultimate hidden
  states of both are concatenated into the cross-attention context (768 + 1280 = 2048 wide), and the second's
  pooled, projected output (1280) conditions the UNet's time embedding, exactly as diffusers'
  ``StableDiffusionXLPipeline.encode_prompt`` computes them, so that training and sampling see the same inputs.
- **Micro-conditioning.** The UNet (``addition_embed_type='text_time'``) also receives six numbers per image:
  the original image size, the crop's top-left corner and the target size, each (height, width). They come from
  the batch (``cond_original_size``, ``cond_crops_coords_top_left``, ``cond_target_size``, written by the data
  loader from the crop it really took); a batch without them is taken as uncropped images of their own size.
  At sampling time they default to the target resolution and can be set (``generate(..., original_size=...)``).
- **Caption dropout** replaces both the context and the pooled embedding by zeros, the unconditional input that
  the SDXL pipeline uses for an empty negative prompt (``force_zeros_for_empty_prompt``), so the guidance that
  sampling applies is the one training taught.

Batches of precomputed latents hold ``text_embeds`` (B, 77, 2048) and ``pooled_text_embeds`` (B, 1280), written
by the pipeline's ``precompute`` stage for an SDXL model.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from diffusion.models.noise import build_inference_scheduler
from diffusion.models.stable_diffusion import StableDiffusion
from diffusion.utils import forwards_kwargs

__all__ = ['MICRO_CONDITIONING_KEYS', 'StableDiffusionXL']

# Batch keys of the size and crop conditioning, in the order the UNet's time ids concatenate them.
MICRO_CONDITIONING_KEYS = ('cond_original_size', 'cond_crops_coords_top_left', 'cond_target_size')


@forwards_kwargs(StableDiffusion, exclude=('unet', 'vae', 'text_encoder', 'tokenizer', 'noise_scheduler'))
class StableDiffusionXL(StableDiffusion):
    """Latent diffusion model of the SDXL architecture; see the module docstring for what differs from SD2.

    Args:
        unet (UNet2DConditionModel): The denoiser, with ``addition_embed_type='text_time'``.
        vae (AutoencoderKL): Image autoencoder (SDXL's scaling factor is 0.13025).
        text_encoder (CLIPTextModel): CLIP ViT-L/14 text tower.
        text_encoder_2 (CLIPTextModelWithProjection): OpenCLIP ViT-bigG/14 text tower with projection.
        tokenizer (CLIPTokenizer): Tokenizer of ``text_encoder`` (pads with the end token).
        tokenizer_2 (CLIPTokenizer): Tokenizer of ``text_encoder_2`` (pads with ``'!'``).
        noise_scheduler (DDPMScheduler): Training noise schedule.
        **kwargs: As for :class:`~diffusion.models.stable_diffusion.StableDiffusion` (``caption_drop_prob``,
            ``min_snr_gamma``, ``train_text_encoder`` (both encoders), ...).
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        noise_scheduler: DDPMScheduler,
        **kwargs: Any,
    ):
        if unet.config.addition_embed_type != 'text_time':
            raise ValueError(
                f"SDXL needs a UNet with addition_embed_type='text_time', got {unet.config.addition_embed_type!r}."
            )
        context = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
        if context != unet.config.cross_attention_dim:
            raise ValueError(
                f'Text encoder widths {text_encoder.config.hidden_size} + {text_encoder_2.config.hidden_size} = '
                f'{context} != UNet cross_attention_dim {unet.config.cross_attention_dim}.'
            )
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        if pooled != text_encoder_2.config.projection_dim:
            raise ValueError(
                f'UNet projection_class_embeddings_input_dim {unet.config.projection_class_embeddings_input_dim} '
                f'must be text_encoder_2 projection_dim ({text_encoder_2.config.projection_dim}) + 6 x '
                f'addition_time_embed_dim ({unet.config.addition_time_embed_dim}).'
            )
        super().__init__(unet, vae, text_encoder, tokenizer, noise_scheduler, **kwargs)
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_2.requires_grad_(self.train_text_encoder)
        self.train()

    def train(self, mode: bool = True) -> StableDiffusionXL:
        super().train(mode)
        if hasattr(self, 'text_encoder_2'):
            self.text_encoder_2.train(mode and self.train_text_encoder)
        return self

    # -- text ------------------------------------------------------------------------------------------------------
    def tokenize(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """Token ids (B, 77) of both tokenizers, each padded to its maximum length."""
        return tuple(
            tok(
                list(captions),
                padding='max_length',
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors='pt',
            ).input_ids
            for tok in (self.tokenizer, self.tokenizer_2)
        )

    def encode_text(  # type: ignore[override]
        self, input_ids: torch.Tensor, input_ids_2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Context (B, 77, D1 + D2): both encoders' penultimate hidden states; pooled (B, P): the second's
        projected output."""
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            first = self.text_encoder(input_ids.to(self.text_encoder.device), output_hidden_states=True)
            second = self.text_encoder_2(input_ids_2.to(self.text_encoder_2.device), output_hidden_states=True)
        context = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return context, second.text_embeds

    def _text_conditioning(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if 'text_embeds' in batch:
            if self.train_text_encoder:
                raise ValueError(
                    'Precomputed text_embeds cannot train the text encoders; set train_text_encoder=false.'
                )
            if 'pooled_text_embeds' not in batch:
                raise KeyError(
                    'SDXL batches of precomputed text_embeds also need pooled_text_embeds (precompute them with an '
                    f'SDXL model); the batch has {sorted(batch)}.'
                )
            return batch['text_embeds'], batch['pooled_text_embeds']
        if 'input_ids' in batch and 'input_ids_2' in batch:
            ids, ids_2 = batch['input_ids'], batch['input_ids_2']
        elif 'captions' in batch:
            ids, ids_2 = self.tokenize(batch['captions'])
        else:
            raise KeyError(
                f'SDXL batches need "captions", "input_ids" and "input_ids_2", or "text_embeds" and '
                f'"pooled_text_embeds"; the batch has {sorted(batch)}.'
            )
        return self.encode_text(ids, ids_2)

    def time_ids(self, batch: dict[str, Any], latents: torch.Tensor) -> torch.Tensor:
        """The UNet's added time ids (B, 6): original size, crop top-left, target size, each (height, width).

        Missing keys default to an uncropped image of the training size (the latents' size times the VAE factor).
        """
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        size = torch.tensor([latents.shape[-2] * factor, latents.shape[-1] * factor], device=latents.device)
        defaults = {
            'cond_original_size': size,
            'cond_crops_coords_top_left': torch.zeros(2, dtype=size.dtype, device=latents.device),
            'cond_target_size': size,
        }
        parts = []
        for key in MICRO_CONDITIONING_KEYS:
            value = batch.get(key)
            value = defaults[key].expand(latents.shape[0], 2) if value is None else torch.as_tensor(value)
            if value.shape != (latents.shape[0], 2):
                raise ValueError(
                    f'Batch key {key!r} must have shape ({latents.shape[0]}, 2), got {tuple(value.shape)}.'
                )
            parts.append(value.to(latents.device, torch.float32))
        return torch.cat(parts, dim=1)

    def _unet_conditioning(self, batch: dict[str, Any], drop_captions: bool, latents: torch.Tensor) -> dict[str, Any]:
        context, pooled = self._text_conditioning(batch)
        context, pooled = context.to(self.unet.device), pooled.to(self.unet.device)
        if drop_captions and self.caption_drop_prob > 0:
            keep = (~self._drop_mask(context.shape[0], context.device)).to(context.dtype)
            context = context * keep[:, None, None]
            pooled = pooled * keep[:, None].to(pooled.dtype)
        return {
            'encoder_hidden_states': context,
            'added_cond_kwargs': {'text_embeds': pooled, 'time_ids': self.time_ids(batch, latents)},
        }

    def text_embeddings(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """The columns that precomputing stores: ``text_embeds`` (B, 77, 2048) and ``pooled_text_embeds`` (B, 1280)."""
        context, pooled = self.encode_text(*self.tokenize(captions))
        return {'text_embeds': context, 'pooled_text_embeds': pooled}

    def _conditioning(self, batch: dict[str, Any], drop_captions: bool) -> torch.Tensor:
        raise NotImplementedError('SDXL conditions the UNet through _unet_conditioning (context, pooled, time ids).')

    # -- sampling --------------------------------------------------------------------------------------------------
    def pipeline(self, scheduler: Optional[str] = None) -> StableDiffusionXLPipeline:
        """A diffusers SDXL pipeline sharing this model's modules (no copies), for sampling and export."""
        return StableDiffusionXLPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2,
            unet=self.unet,
            scheduler=build_inference_scheduler(scheduler or self.inference_scheduler, self.noise_scheduler),
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )

    def _pipeline_call_kwargs(
        self,
        original_size: Optional[Sequence[int]] = None,
        crops_coords_top_left: Sequence[int] = (0, 0),
        target_size: Optional[Sequence[int]] = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """SDXL's sampling conditioning, each (height, width) / (top, left); sizes default to the output size."""
        super()._pipeline_call_kwargs(**kwargs)  # rejects unknown names
        return {
            'original_size': None if original_size is None else tuple(int(v) for v in original_size),
            'crops_coords_top_left': tuple(int(v) for v in crops_coords_top_left),
            'target_size': None if target_size is None else tuple(int(v) for v in target_size),
        }
