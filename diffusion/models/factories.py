"""Factories that return a ready :class:`StableDiffusion` from a few arguments.

``stable_diffusion_2`` builds the SD2-base architecture (CommonCanvas-S): the 865.9M-parameter UNet, the OpenCLIP
ViT-H/14 text tower as a transformers ``CLIPTextModel`` and the SD VAE, with the configs of shared/REFERENCE.md.
``tiny_stable_diffusion`` builds the same classes at a size that trains on a CPU (tests and ``make demo``).
Either loads components with diffusers/transformers ``from_pretrained`` from a diffusers pipeline folder (local
path or hub id) when ``pretrained_model_name_or_path`` is given, and builds the rest from config with random
weights.
"""

from __future__ import annotations

import copy
from typing import Any, Optional, Sequence

from diffusers import AutoencoderKL, UNet2DConditionModel

from diffusion.models.noise import build_noise_scheduler
from diffusion.models.stable_diffusion import StableDiffusion
from diffusion.models.text_encoders import SD2_TEXT_ENCODER_CONFIG, build_clip_tokenizer, build_text_encoder
from diffusion.utils import check_kwargs, forwards_kwargs

__all__ = [
    'SD2_UNET_CONFIG',
    'SD_VAE_CONFIG',
    'TINY_TEXT_ENCODER_CONFIG',
    'TINY_UNET_CONFIG',
    'TINY_VAE_CONFIG',
    'build_stable_diffusion',
    'merge_config',
    'stable_diffusion_2',
    'tiny_stable_diffusion',
]

COMPONENTS = ('unet', 'vae', 'text_encoder', 'tokenizer')
_BUILT_HERE = (*COMPONENTS, 'noise_scheduler')

SD2_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024,
    use_linear_projection=True,
    down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'),
    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'),
)

SD_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=('DownEncoderBlock2D',) * 4,
    up_block_types=('UpDecoderBlock2D',) * 4,
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
    scaling_factor=0.18215,
)

# Small enough to train on two CPU cores in minutes; same classes as the full model.
TINY_UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(64, 128),
    layers_per_block=1,
    attention_head_dim=8,
    cross_attention_dim=64,
    norm_num_groups=16,
    use_linear_projection=True,
    down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'),
    up_block_types=('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'),
)

TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64, 64),
    down_block_types=('DownEncoderBlock2D',) * 3,
    up_block_types=('UpDecoderBlock2D',) * 3,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    mid_block_add_attention=False,  # attention at 8x8 adds time and nothing measurable to reconstructions here
    sample_size=32,
    scaling_factor=1.0,  # replaced by the calibrated 1 / latent std when a trained autoencoder is exported
)

TINY_TEXT_ENCODER_CONFIG = dict(
    SD2_TEXT_ENCODER_CONFIG,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    projection_dim=64,
)


def merge_config(defaults: dict, overrides: Optional[dict]) -> dict:
    """A deep copy of ``defaults`` with ``overrides`` applied (yaml lists become the tuples diffusers uses)."""
    config = copy.deepcopy(defaults)
    for key, value in (overrides or {}).items():
        config[key] = tuple(value) if isinstance(value, list) else value
    return config


@forwards_kwargs(StableDiffusion, exclude=_BUILT_HERE)
def build_stable_diffusion(
    unet_config: dict,
    vae_config: dict,
    text_encoder_config: dict,
    *,
    pretrained_model_name_or_path: Optional[str] = None,
    pretrained_components: Sequence[str] = ('vae', 'text_encoder', 'tokenizer'),
    tokenizer_pad_token: str = '!',
    prediction_type: str = 'epsilon',
    zero_terminal_snr: bool = False,
    num_train_timesteps: int = 1000,
    beta_schedule: str = 'scaled_linear',
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    **model_kwargs: Any,
) -> StableDiffusion:
    """Assemble a :class:`StableDiffusion` from component configs, loading the ``pretrained_components``.

    Args:
        unet_config (dict): ``UNet2DConditionModel`` config used when the UNet is not loaded.
        vae_config (dict): ``AutoencoderKL`` config used when the VAE is not loaded.
        text_encoder_config (dict): ``CLIPTextConfig`` fields used when the text encoder is not loaded.
        pretrained_model_name_or_path (str, optional): A diffusers pipeline folder or hub id with the subfolders
            ``unet``, ``vae``, ``text_encoder``, ``tokenizer``.
        pretrained_components (Sequence[str]): Which components to load from it. Default: VAE, text encoder
            and tokenizer (the CommonCanvas recipe trains the UNet from scratch).
        tokenizer_pad_token (str): Pad token of the offline tokenizer. Default: ``'!'`` (SD2).
        prediction_type, zero_terminal_snr, num_train_timesteps, beta_schedule, beta_start, beta_end: Training
            noise schedule, see :func:`diffusion.models.noise.build_noise_scheduler`.
        **model_kwargs: Passed to :class:`StableDiffusion` (``caption_drop_prob``, ``min_snr_gamma``, ...).
    """
    check_kwargs(StableDiffusion, model_kwargs, where='model', provided=_BUILT_HERE)
    unknown = sorted(set(pretrained_components) - set(COMPONENTS))
    if unknown:
        raise ValueError(f'Unknown pretrained_components {unknown}. Valid components: {", ".join(COMPONENTS)}.')
    root = pretrained_model_name_or_path
    load = set(pretrained_components) if root is not None else set()

    # use_safetensors=True: a pickled .bin, which runs code when loaded, is refused (see diffusion/checkpointing.py).
    unet = (
        UNet2DConditionModel.from_pretrained(root, subfolder='unet', use_safetensors=True)
        if 'unet' in load
        else UNet2DConditionModel(**unet_config)
    )
    vae = (
        AutoencoderKL.from_pretrained(root, subfolder='vae', use_safetensors=True)
        if 'vae' in load
        else AutoencoderKL(**vae_config)
    )
    text_encoder = (
        build_text_encoder(pretrained=root, subfolder='text_encoder', use_safetensors=True)
        if 'text_encoder' in load
        else build_text_encoder(text_encoder_config)
    )
    tokenizer = (
        build_clip_tokenizer(root, subfolder='tokenizer')
        if 'tokenizer' in load
        else build_clip_tokenizer(pad_token=tokenizer_pad_token)
    )
    if text_encoder.config.hidden_size != unet.config.cross_attention_dim:
        raise ValueError(
            f'Text encoder width {text_encoder.config.hidden_size} != UNet cross_attention_dim '
            f'{unet.config.cross_attention_dim}; set unet_config.cross_attention_dim to match.'
        )
    noise_scheduler = build_noise_scheduler(
        prediction_type=prediction_type,
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        beta_start=beta_start,
        beta_end=beta_end,
        zero_terminal_snr=zero_terminal_snr,
    )
    return StableDiffusion(unet, vae, text_encoder, tokenizer, noise_scheduler, **model_kwargs)


@forwards_kwargs(build_stable_diffusion, exclude=('unet_config', 'vae_config', 'text_encoder_config'))
def stable_diffusion_2(
    unet_config: Optional[dict] = None,
    vae_config: Optional[dict] = None,
    text_encoder_config: Optional[dict] = None,
    **kwargs: Any,
) -> StableDiffusion:
    """The SD2-base architecture (CommonCanvas-S); the ``*_config`` dicts override single fields.

    With ``pretrained_model_name_or_path='stabilityai/stable-diffusion-2-base'`` (or a local copy) the VAE, text
    encoder and tokenizer are the released ones; otherwise every component starts from random weights.
    See :func:`build_stable_diffusion` for the other arguments.
    """
    return build_stable_diffusion(
        merge_config(SD2_UNET_CONFIG, unet_config),
        merge_config(SD_VAE_CONFIG, vae_config),
        merge_config(SD2_TEXT_ENCODER_CONFIG, text_encoder_config),
        **kwargs,
    )


@forwards_kwargs(build_stable_diffusion, exclude=('unet_config', 'vae_config', 'text_encoder_config'))
def tiny_stable_diffusion(
    unet_config: Optional[dict] = None,
    vae_config: Optional[dict] = None,
    text_encoder_config: Optional[dict] = None,
    **kwargs: Any,
) -> StableDiffusion:
    """A CPU-sized model of the same classes (UNet 64/128 channels, 3-block VAE, 2-layer CLIP text encoder).

    The tokenizer is the real CLIP tokenizer. See :func:`build_stable_diffusion` for the other arguments.
    """
    return build_stable_diffusion(
        merge_config(TINY_UNET_CONFIG, unet_config),
        merge_config(TINY_VAE_CONFIG, vae_config),
        merge_config(TINY_TEXT_ENCODER_CONFIG, text_encoder_config),
        **kwargs,
    )
