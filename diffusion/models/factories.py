"""Factories that return a ready :class:`StableDiffusion` from a few arguments.

``stable_diffusion_2`` builds the SD2-base architecture (CommonCanvas-S): the 865.9M-parameter UNet, the OpenCLIP
ViT-H/14 text tower as a transformers ``CLIPTextModel`` and the SD VAE, with the configs of shared/REFERENCE.md.
``stable_diffusion_xl`` builds the SDXL-base architecture (CommonCanvas-XL): the 2.57B-parameter UNet with the
``text_time`` added embedding, CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 (with projection) text towers and the SDXL
VAE. ``tiny_stable_diffusion`` and ``tiny_stable_diffusion_xl`` build the same classes at a size that trains on a
CPU (tests and ``make demo``). Each loads components with diffusers/transformers ``from_pretrained`` from a
diffusers pipeline folder (local path or hub id) when ``pretrained_model_name_or_path`` is given, and builds the
rest from config with random weights.
"""

from __future__ import annotations

import copy
from typing import Any, Optional, Sequence

from diffusers import AutoencoderKL, UNet2DConditionModel

from diffusion.models.noise import build_noise_scheduler
from diffusion.models.stable_diffusion import StableDiffusion
from diffusion.models.stable_diffusion_xl import StableDiffusionXL
from diffusion.models.text_encoders import (
    EOS_TOKEN,
    SD2_TEXT_ENCODER_CONFIG,
    SDXL_TEXT_ENCODER_2_CONFIG,
    SDXL_TEXT_ENCODER_CONFIG,
    build_clip_tokenizer,
    build_text_encoder,
)
from diffusion.utils import check_kwargs, forwards_kwargs

__all__ = [
    'SD2_UNET_CONFIG',
    'SDXL_UNET_CONFIG',
    'SDXL_VAE_CONFIG',
    'SD_VAE_CONFIG',
    'TINY_SDXL_UNET_CONFIG',
    'TINY_TEXT_ENCODER_CONFIG',
    'TINY_UNET_CONFIG',
    'TINY_VAE_CONFIG',
    'build_stable_diffusion',
    'build_stable_diffusion_xl',
    'merge_config',
    'stable_diffusion_2',
    'stable_diffusion_xl',
    'tiny_stable_diffusion',
    'tiny_stable_diffusion_xl',
]

COMPONENTS = ('unet', 'vae', 'text_encoder', 'tokenizer')
_BUILT_HERE = (*COMPONENTS, 'noise_scheduler')
XL_COMPONENTS = ('unet', 'vae', 'text_encoder', 'text_encoder_2', 'tokenizer', 'tokenizer_2')
_XL_BUILT_HERE = (*XL_COMPONENTS, 'noise_scheduler')

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

# SDXL-base (2,567,463,684 parameters): three levels, 1/2/10 transformer layers, a 2048-wide text context, and
# the pooled text embedding (1280) plus six size/crop numbers (6 x 256) added to the time embedding.
SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type='text_time',
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'),
    up_block_types=('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'),
)

# The SD VAE's shape with SDXL's scaling factor; it overflows in fp16, so pipelines upcast it.
SDXL_VAE_CONFIG = dict(SD_VAE_CONFIG, sample_size=1024, scaling_factor=0.13025, force_upcast=True)

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

# The SDXL UNet's structure (text_time embedding, a level without attention, several transformer layers) at CPU size.
TINY_SDXL_UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    transformer_layers_per_block=(1, 2),
    attention_head_dim=8,
    cross_attention_dim=64,
    norm_num_groups=16,
    use_linear_projection=True,
    addition_embed_type='text_time',
    addition_time_embed_dim=16,
    projection_class_embeddings_input_dim=32 + 6 * 16,
    down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
    up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'),
)

TINY_SDXL_TEXT_ENCODER_CONFIG = dict(
    SDXL_TEXT_ENCODER_CONFIG, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
)
TINY_SDXL_TEXT_ENCODER_2_CONFIG = dict(
    SDXL_TEXT_ENCODER_2_CONFIG,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    projection_dim=32,
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


def _components_to_load(root: Optional[str], requested: Sequence[str], valid: Sequence[str]) -> set[str]:
    unknown = sorted(set(requested) - set(valid))
    if unknown:
        raise ValueError(f'Unknown pretrained_components {unknown}. Valid components: {", ".join(valid)}.')
    return set(requested) if root is not None else set()


# use_safetensors=True: a pickled .bin, which runs code when loaded, is refused (see diffusion/checkpointing.py).
def _unet(root: Optional[str], load: set[str], config: dict) -> UNet2DConditionModel:
    if 'unet' in load:
        return UNet2DConditionModel.from_pretrained(root, subfolder='unet', use_safetensors=True)
    return UNet2DConditionModel(**config)


def _vae(root: Optional[str], load: set[str], config: dict) -> AutoencoderKL:
    if 'vae' in load:
        return AutoencoderKL.from_pretrained(root, subfolder='vae', use_safetensors=True)
    return AutoencoderKL(**config)


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
    load = _components_to_load(pretrained_model_name_or_path, pretrained_components, COMPONENTS)
    root = pretrained_model_name_or_path
    unet = _unet(root, load, unet_config)
    vae = _vae(root, load, vae_config)
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


@forwards_kwargs(StableDiffusionXL, exclude=_XL_BUILT_HERE)
def build_stable_diffusion_xl(
    unet_config: dict,
    vae_config: dict,
    text_encoder_config: dict,
    text_encoder_2_config: dict,
    *,
    pretrained_model_name_or_path: Optional[str] = None,
    pretrained_components: Sequence[str] = ('vae', 'text_encoder', 'text_encoder_2', 'tokenizer', 'tokenizer_2'),
    prediction_type: str = 'epsilon',
    zero_terminal_snr: bool = False,
    num_train_timesteps: int = 1000,
    beta_schedule: str = 'scaled_linear',
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    **model_kwargs: Any,
) -> StableDiffusionXL:
    """Assemble a :class:`StableDiffusionXL` from component configs, loading the ``pretrained_components``.

    Args:
        unet_config (dict): ``UNet2DConditionModel`` config (``addition_embed_type='text_time'``).
        vae_config (dict): ``AutoencoderKL`` config.
        text_encoder_config (dict): ``CLIPTextConfig`` fields of the CLIP ViT-L/14 text tower.
        text_encoder_2_config (dict): ``CLIPTextConfig`` fields of the OpenCLIP ViT-bigG/14 tower (with projection).
        pretrained_model_name_or_path (str, optional): A diffusers SDXL pipeline folder or hub id with the subfolders
            ``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``, ``tokenizer``, ``tokenizer_2``.
        pretrained_components (Sequence[str]): Which components to load from it. Default: all but the UNet.
        prediction_type, zero_terminal_snr, num_train_timesteps, beta_schedule, beta_start, beta_end: Training
            noise schedule, see :func:`diffusion.models.noise.build_noise_scheduler`.
        **model_kwargs: Passed to :class:`StableDiffusionXL` (``caption_drop_prob``, ``min_snr_gamma``, ...).
    """
    check_kwargs(StableDiffusionXL, model_kwargs, where='model', provided=_XL_BUILT_HERE)
    load = _components_to_load(pretrained_model_name_or_path, pretrained_components, XL_COMPONENTS)
    root = pretrained_model_name_or_path
    text_encoders = {}
    for name, config, projection in (
        ('text_encoder', text_encoder_config, False),
        ('text_encoder_2', text_encoder_2_config, True),
    ):
        text_encoders[name] = (
            build_text_encoder(pretrained=root, subfolder=name, use_safetensors=True, with_projection=projection)
            if name in load
            else build_text_encoder(config, with_projection=projection)
        )
    # SDXL's CLIP-L tokenizer pads with the end token, the bigG one with '!'.
    tokenizers = {
        name: build_clip_tokenizer(root, subfolder=name) if name in load else build_clip_tokenizer(pad_token=pad)
        for name, pad in (('tokenizer', EOS_TOKEN), ('tokenizer_2', '!'))
    }
    noise_scheduler = build_noise_scheduler(
        prediction_type=prediction_type,
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        beta_start=beta_start,
        beta_end=beta_end,
        zero_terminal_snr=zero_terminal_snr,
    )
    return StableDiffusionXL(
        _unet(root, load, unet_config),
        _vae(root, load, vae_config),
        text_encoders['text_encoder'],
        text_encoders['text_encoder_2'],
        tokenizers['tokenizer'],
        tokenizers['tokenizer_2'],
        noise_scheduler,
        **model_kwargs,
    )


_XL_CONFIGS = ('unet_config', 'vae_config', 'text_encoder_config', 'text_encoder_2_config')


@forwards_kwargs(build_stable_diffusion_xl, exclude=_XL_CONFIGS)
def stable_diffusion_xl(
    unet_config: Optional[dict] = None,
    vae_config: Optional[dict] = None,
    text_encoder_config: Optional[dict] = None,
    text_encoder_2_config: Optional[dict] = None,
    **kwargs: Any,
) -> StableDiffusionXL:
    """The SDXL-base architecture (CommonCanvas-XL); the ``*_config`` dicts override single fields.

    With ``pretrained_model_name_or_path='stabilityai/stable-diffusion-xl-base-1.0'`` (or a local copy) the VAE,
    both text encoders and tokenizers are the released ones; otherwise every component starts from random weights.
    See :func:`build_stable_diffusion_xl` for the other arguments.
    """
    return build_stable_diffusion_xl(
        merge_config(SDXL_UNET_CONFIG, unet_config),
        merge_config(SDXL_VAE_CONFIG, vae_config),
        merge_config(SDXL_TEXT_ENCODER_CONFIG, text_encoder_config),
        merge_config(SDXL_TEXT_ENCODER_2_CONFIG, text_encoder_2_config),
        **kwargs,
    )


@forwards_kwargs(build_stable_diffusion_xl, exclude=_XL_CONFIGS)
def tiny_stable_diffusion_xl(
    unet_config: Optional[dict] = None,
    vae_config: Optional[dict] = None,
    text_encoder_config: Optional[dict] = None,
    text_encoder_2_config: Optional[dict] = None,
    **kwargs: Any,
) -> StableDiffusionXL:
    """A CPU-sized model of the SDXL classes (two 2-layer text towers, a two-level text_time UNet, tiny VAE).

    See :func:`build_stable_diffusion_xl` for the other arguments.
    """
    return build_stable_diffusion_xl(
        merge_config(TINY_SDXL_UNET_CONFIG, unet_config),
        merge_config(TINY_VAE_CONFIG, vae_config),
        merge_config(TINY_SDXL_TEXT_ENCODER_CONFIG, text_encoder_config),
        merge_config(TINY_SDXL_TEXT_ENCODER_2_CONFIG, text_encoder_2_config),
        **kwargs,
    )
