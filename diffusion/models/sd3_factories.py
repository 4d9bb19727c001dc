"""Factories of the MMDiT family: the SD3-medium shape and a CPU-sized twin, composed by
:func:`~diffusion.models.factories.latent_diffusion` from the ``mmdit`` denoiser, the ``sd3`` text conditioner (two
CLIPs + T5), a 16-channel ``AutoencoderKL`` with a shift factor and the ``rectified_flow`` objective.

Each component loads from a diffusers SD3 pipeline folder or hub id (``use_safetensors=True``) when named in
``pretrained_components``; the rest are built from the presets with random weights.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

from diffusion.models.factories import SD_VAE_CONFIG, TINY_VAE_CONFIG, latent_diffusion, merge_config
from diffusion.models.stable_diffusion import StableDiffusion

__all__ = ['SD3_VAE_CONFIG', 'TINY_SD3_VAE_CONFIG', 'stable_diffusion_3', 'tiny_stable_diffusion_3']

# SD3's VAE: the SD VAE's shape with 16 latent channels, no quant convolutions, scale 1.5305 and shift 0.0609.
SD3_VAE_CONFIG = dict(
    SD_VAE_CONFIG,
    latent_channels=16,
    sample_size=1024,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
# The tiny VAE with 16 channels; scale and shift are set from the latents when a trained one is exported.
TINY_SD3_VAE_CONFIG = dict(TINY_VAE_CONFIG, latent_channels=16, shift_factor=0.0)

# SD3 trains at 1024px with shift 3.0 (SD3 paper, sec. 5.3.2).
SD3_OBJECTIVE = {'name': 'rectified_flow', 'shift': 3.0}


def _build(
    preset: str,
    vae_defaults: dict,
    transformer_config: Optional[dict],
    vae_config: Optional[dict],
    text_encoder_config: Optional[dict],
    text_encoder_2_config: Optional[dict],
    text_encoder_3_config: Optional[dict],
    objective: Union[str, Mapping[str, Any], None],
    max_length: int,
    clip_max_length: Optional[int],
    use_attention_mask: bool,
    caption_drop_prob: float,
    train_text_encoder: bool,
    **kwargs: Any,
) -> StableDiffusion:
    return latent_diffusion(
        denoiser={'name': 'mmdit', 'preset': 'sd3_medium' if preset == 'sd3' else preset, 'config': transformer_config},
        text_conditioner={
            'name': 'sd3',
            'preset': preset,
            'text_encoder_config': text_encoder_config,
            'text_encoder_2_config': text_encoder_2_config,
            'text_encoder_3_config': text_encoder_3_config,
            'max_length': max_length,
            'clip_max_length': clip_max_length,
            'use_attention_mask': use_attention_mask,
            'caption_drop_prob': caption_drop_prob,
            'train_text_encoder': train_text_encoder,
        },
        vae_config=merge_config(vae_defaults, vae_config),
        objective=objective,
        **kwargs,
    )


def stable_diffusion_3(
    transformer_config: Optional[dict] = None,
    vae_config: Optional[dict] = None,
    text_encoder_config: Optional[dict] = None,
    text_encoder_2_config: Optional[dict] = None,
    text_encoder_3_config: Optional[dict] = None,
    *,
    objective: Union[str, Mapping[str, Any], None] = None,
    max_length: int = 256,
    clip_max_length: Optional[int] = None,
    use_attention_mask: bool = True,
    pretrained_model_name_or_path: Optional[str] = None,
    pretrained_components: Sequence[str] = (
        'vae',
        'text_encoder',
        'text_encoder_2',
        'text_encoder_3',
        'tokenizer',
        'tokenizer_2',
        'tokenizer_3',
    ),
    caption_drop_prob: float = 0.0,
    train_text_encoder: bool = False,
    train_vae: bool = False,
    val_seed: int = 1138,
) -> StableDiffusion:
    """The SD3-medium architecture (2.03B-parameter MMDiT, CLIP-L + CLIP-G + T5-XXL, 16-channel VAE).

    Args:
        transformer_config (dict, optional): ``SD3Transformer2DModel`` fields over the SD3-medium shape.
        vae_config (dict, optional): ``AutoencoderKL`` fields over SD3's VAE.
        text_encoder_config, text_encoder_2_config (dict, optional): ``CLIPTextConfig`` fields of CLIP-L and CLIP-G.
        text_encoder_3_config (dict, optional): ``T5Config`` fields of T5 v1.1 XXL's encoder.
        objective (str | Mapping, optional): The objective section. Default: rectified flow with shift 3.0.
        max_length (int): T5 tokens per caption. Default: ``256``.
        clip_max_length (int, optional): Tokens per caption of the two CLIPs instead of 77 (short captions need
            fewer, and the joint attention then attends over fewer text tokens). Default: ``None`` (77).
        use_attention_mask (bool): Mask T5's padding. Default: ``True``.
        pretrained_model_name_or_path (str, optional): A diffusers SD3 pipeline folder or hub id.
        pretrained_components (Sequence[str]): Which components to load from it. Default: all but the transformer.
        caption_drop_prob, train_text_encoder, train_vae, val_seed: As for
            :func:`~diffusion.models.factories.latent_diffusion` and the text conditioner.
    """
    return _build(
        'sd3',
        SD3_VAE_CONFIG,
        transformer_config,
        vae_config,
        text_encoder_config,
        text_encoder_2_config,
        text_encoder_3_config,
        objective or SD3_OBJECTIVE,
        max_length,
        clip_max_length,
        use_attention_mask,
        caption_drop_prob,
        train_text_encoder,
        pretrained_model_name_or_path=pretrained_model_name_or_path,
        pretrained_components=pretrained_components,
        train_vae=train_vae,
        val_seed=val_seed,
    )


def tiny_stable_diffusion_3(
    transformer_config: Optional[dict] = None,
    vae_config: Optional[dict] = None,
    text_encoder_config: Optional[dict] = None,
    text_encoder_2_config: Optional[dict] = None,
    text_encoder_3_config: Optional[dict] = None,
    *,
    objective: Union[str, Mapping[str, Any], None] = None,
    max_length: int = 32,
    clip_max_length: Optional[int] = None,
    use_attention_mask: bool = True,
    pretrained_model_name_or_path: Optional[str] = None,
    pretrained_components: Sequence[str] = (),
    caption_drop_prob: float = 0.0,
    train_text_encoder: bool = False,
    train_vae: bool = False,
    val_seed: int = 1138,
) -> StableDiffusion:
    """A CPU-sized model of the same components: a 2-block MMDiT, 2-layer CLIPs and T5, the offline tokenizers
    (T5's built from the synthetic captions) and the tiny VAE with 16 channels. Arguments as
    :func:`stable_diffusion_3`; ``max_length`` defaults to 32 T5 tokens and the objective to rectified flow
    without shift."""
    return _build(
        'tiny',
        TINY_SD3_VAE_CONFIG,
        transformer_config,
        vae_config,
        text_encoder_config,
        text_encoder_2_config,
        text_encoder_3_config,
        objective or 'rectified_flow',
        max_length,
        clip_max_length,
        use_attention_mask,
        caption_drop_prob,
        train_text_encoder,
        pretrained_model_name_or_path=pretrained_model_name_or_path,
        pretrained_components=pretrained_components,
        train_vae=train_vae,
        val_seed=val_seed,
    )
