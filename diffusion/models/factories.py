"""Factories that return a ready :class:`StableDiffusion` from a few arguments.

``latent_diffusion`` composes a model from components named in the config (a denoiser, a text conditioner, an
objective; see :mod:`diffusion.models.registries`) and an autoencoder. The family factories fill those components
from presets: ``stable_diffusion_2`` builds the SD2-base architecture (CommonCanvas-S): the 865.9M-parameter UNet,
the OpenCLIP ViT-H/14 text tower as a transformers ``CLIPTextModel`` and the SD VAE. ``stable_diffusion_xl`` builds
the SDXL-base architecture (CommonCanvas-XL): the 2.57B-parameter UNet with the ``text_time`` added embedding, CLIP
ViT-L/14 and OpenCLIP ViT-bigG/14 (with projection) text towers and the SDXL VAE. ``tiny_stable_diffusion`` and
``tiny_stable_diffusion_xl`` build the same components at a size that trains on a CPU (tests and ``make demo``).
Each loads components with diffusers/transformers ``from_pretrained`` (``use_safetensors=True``) from a diffusers
pipeline folder (local path or hub id) when ``pretrained_model_name_or_path`` is given, and builds the rest from
config with random weights. The training objective is the DDPM family set by the flat keys (``prediction_type``,
``min_snr_gamma``, ...) unless ``objective: {name: ...}`` names another.
"""

from __future__ import annotations

import copy
import functools
import inspect
from typing import Any, Mapping, Optional, Sequence, Union

from diffusers import AutoencoderKL, DDPMScheduler

from diffusion.models.conditioners import CLIPTextConditioner, SDXLTextConditioner
from diffusion.models.denoisers import UNetDenoiser
from diffusion.models.mmdit import MMDiTDenoiser
from diffusion.models.objectives import DDPMObjective
from diffusion.models.rectified_flow import FLOW_SCHEDULERS, RectifiedFlowObjective
from diffusion.models.registries import build_component, denoisers, objectives, text_conditioners
from diffusion.models.stable_diffusion import StableDiffusion
from diffusion.models.t5_conditioners import SD3TextConditioner, T5TextConditioner
from diffusion.models.text_encoders import (
    SD2_TEXT_ENCODER_CONFIG,
    SDXL_TEXT_ENCODER_2_CONFIG,
    SDXL_TEXT_ENCODER_CONFIG,
)
from diffusion.utils import check_kwargs, forwards_kwargs

__all__ = [
    'objective_from_scheduler',
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
    'from_pipeline',
    'latent_diffusion',
    'merge_config',
    'pipeline_names',
    'stable_diffusion_2',
    'stable_diffusion_xl',
    'tiny_stable_diffusion',
    'tiny_stable_diffusion_xl',
]

COMPONENTS = ('unet', 'vae', 'text_encoder', 'tokenizer')
XL_COMPONENTS = ('unet', 'vae', 'text_encoder', 'text_encoder_2', 'tokenizer', 'tokenizer_2')

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


def _check_pretrained(pretrained_components: Sequence[str], valid: Sequence[str]) -> None:
    unknown = sorted(set(pretrained_components) - set(valid))
    if unknown:
        raise ValueError(f'Unknown pretrained_components {unknown}. Valid components: {", ".join(valid)}.')


def latent_diffusion(
    denoiser: Mapping[str, Any],
    text_conditioner: Mapping[str, Any],
    vae_config: Optional[dict] = None,
    objective: Optional[Union[str, Mapping[str, Any]]] = None,
    *,
    pretrained_model_name_or_path: Optional[str] = None,
    pretrained_components: Sequence[str] = (),
    train_vae: bool = False,
    val_seed: int = 1138,
) -> StableDiffusion:
    """A :class:`StableDiffusion` composed of components named in the config.

    Args:
        denoiser (Mapping): ``{name: <denoisers entry>, <its arguments>}``, e.g. ``{name: unet, config: {...}}``.
        text_conditioner (Mapping): ``{name: <text_conditioners entry>, ...}``, e.g. ``{name: clip, ...}``.
        vae_config (dict, optional): ``AutoencoderKL`` arguments when the VAE is not loaded. Default: the SD VAE.
        objective (str | Mapping, optional): ``{name: <objectives entry>, ...}``, or a name alone for its defaults
            (``rectified_flow``). Default: ``{name: ddpm}``.
        pretrained_model_name_or_path (str, optional): A diffusers pipeline folder or hub id.
        pretrained_components (Sequence[str]): Which of its components to load (``vae``, the denoiser's and the
            conditioner's component names, e.g. ``unet``, ``text_encoder``, ``tokenizer``).
        train_vae (bool): Train the VAE too. Default: ``False``.
        val_seed (int): Seed of the validation noise. Default: ``1138``.
    """
    return _compose(
        denoiser, text_conditioner, vae_config, objective, pretrained_model_name_or_path, pretrained_components
    )(train_vae=train_vae, val_seed=val_seed)


def _compose(
    denoiser: Mapping[str, Any],
    text_conditioner: Mapping[str, Any],
    vae_config: Optional[dict],
    objective: Optional[Union[str, Mapping[str, Any]]],
    root: Optional[str],
    pretrained_components: Sequence[str],
    conditioner_first: bool = False,
) -> Any:
    """Build the components and return a function that assembles the model from them.

    The components are built in a fixed order (denoiser, autoencoder, text conditioner; or the conditioner first
    when ``conditioner_first``), since each draws its random initial weights from the global RNG: the order is part
    of what makes a seeded run repeat. SDXL's factory has always built its text encoders first.
    """
    load = set(pretrained_components) if root is not None else set()

    def build_conditioner() -> Any:
        return build_component(
            text_conditioners, text_conditioner, where='model.text_conditioner', pretrained=root, load=load
        )

    conditioner = build_conditioner() if conditioner_first else None
    built_denoiser = build_component(denoisers, denoiser, where='model.denoiser', pretrained=root, load=load)
    if 'vae' in load:
        vae = AutoencoderKL.from_pretrained(root, subfolder='vae', use_safetensors=True)
    else:
        vae = AutoencoderKL(**merge_config(SD_VAE_CONFIG, vae_config))
    conditioner = conditioner or build_conditioner()
    _check_pretrained(pretrained_components, (built_denoiser.attribute, 'vae', *conditioner.components()))
    built_objective = build_component(objectives, objective, where='model.objective', default='ddpm')
    return functools.partial(StableDiffusion, built_denoiser, vae, conditioner, built_objective)


@forwards_kwargs(DDPMObjective, exclude=('noise_scheduler',))
def _objective_section(objective: Optional[Union[str, Mapping[str, Any]]], **ddpm_kwargs: Any) -> dict[str, Any]:
    """The objective section: ``objective`` when given, else the DDPM objective of the flat keys."""
    if objective is None:
        return {'name': 'ddpm', **ddpm_kwargs}
    if isinstance(objective, str):  # `model.objective: rectified_flow`: a name with its defaults
        objective = {'name': objective}
    if ddpm_kwargs:
        raise ValueError(
            f'model.objective replaces the DDPM keys {sorted(ddpm_kwargs)}; move them into model.objective '
            '(e.g. model.objective: {name: ddpm, prediction_type: v_prediction}).'
        )
    return dict(objective)


@forwards_kwargs(_objective_section, exclude=('objective',))
def build_stable_diffusion(
    unet_config: dict,
    vae_config: dict,
    text_encoder_config: dict,
    *,
    pretrained_model_name_or_path: Optional[str] = None,
    pretrained_components: Sequence[str] = ('vae', 'text_encoder', 'tokenizer'),
    tokenizer_pad_token: str = '!',
    tokenizer_max_length: Optional[int] = None,
    caption_drop_prob: float = 0.0,
    train_text_encoder: bool = False,
    train_vae: bool = False,
    val_seed: int = 1138,
    objective: Optional[Union[str, Mapping[str, Any]]] = None,
    **objective_kwargs: Any,
) -> StableDiffusion:
    """A UNet + CLIP model of the SD2 family from component configs, loading the ``pretrained_components``.

    Args:
        unet_config (dict): ``UNet2DConditionModel`` config used when the UNet is not loaded.
        vae_config (dict): ``AutoencoderKL`` config used when the VAE is not loaded.
        text_encoder_config (dict): ``CLIPTextConfig`` fields used when the text encoder is not loaded.
        pretrained_model_name_or_path (str, optional): A diffusers pipeline folder or hub id with the subfolders
            ``unet``, ``vae``, ``text_encoder``, ``tokenizer``.
        pretrained_components (Sequence[str]): Which components to load from it. Default: VAE, text encoder
            and tokenizer (the CommonCanvas recipe trains the UNet from scratch).
        tokenizer_pad_token (str): Pad token of the offline tokenizer. Default: ``'!'`` (SD2).
        tokenizer_max_length (int, optional): Tokens per caption instead of the tokenizer's 77 (fewer for short
            captions: a cheaper encoder and cross-attention); saved with the tokenizer. Default: ``None``.
        caption_drop_prob (float): Fraction of training captions replaced by the empty caption. Default: ``0.0``.
        train_text_encoder (bool): Train the text encoder too. Default: ``False``.
        train_vae, val_seed: See :class:`StableDiffusion`.
        objective (str | Mapping, optional): ``{name: ..., ...}`` of another objective, or its name alone
            (``model.objective: rectified_flow``); replaces the DDPM keys.
        **objective_kwargs: The DDPM objective's keys (``prediction_type``, ``zero_terminal_snr``,
            ``min_snr_gamma``, ``offset_noise``, ``inference_scheduler``, ...; see
            :class:`~diffusion.models.objectives.DDPMObjective`).
    """
    check_kwargs(build_stable_diffusion, objective_kwargs, where='model')
    _check_pretrained(pretrained_components if pretrained_model_name_or_path else (), COMPONENTS)
    return latent_diffusion(
        denoiser={'name': 'unet', 'config': unet_config},
        text_conditioner={
            'name': 'clip',
            'text_encoder_config': text_encoder_config,
            'tokenizer_pad_token': tokenizer_pad_token,
            'tokenizer_max_length': tokenizer_max_length,
            'caption_drop_prob': caption_drop_prob,
            'train_text_encoder': train_text_encoder,
        },
        vae_config=vae_config,
        objective=_objective_section(objective, **objective_kwargs),
        pretrained_model_name_or_path=pretrained_model_name_or_path,
        pretrained_components=pretrained_components,
        train_vae=train_vae,
        val_seed=val_seed,
    )


_CONFIGS = ('unet_config', 'vae_config', 'text_encoder_config')


@forwards_kwargs(build_stable_diffusion, exclude=_CONFIGS)
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


@forwards_kwargs(build_stable_diffusion, exclude=_CONFIGS)
def tiny_stable_diffusion(
    unet_config: Optional[dict] = None,
    vae_config: Optional[dict] = None,
    text_encoder_config: Optional[dict] = None,
    **kwargs: Any,
) -> StableDiffusion:
    """A CPU-sized model of the same components (UNet 64/128 channels, 3-block VAE, 2-layer CLIP text encoder).

    The tokenizer is the real CLIP tokenizer. See :func:`build_stable_diffusion` for the other arguments.
    """
    return build_stable_diffusion(
        merge_config(TINY_UNET_CONFIG, unet_config),
        merge_config(TINY_VAE_CONFIG, vae_config),
        merge_config(TINY_TEXT_ENCODER_CONFIG, text_encoder_config),
        **kwargs,
    )


@forwards_kwargs(_objective_section, exclude=('objective',))
def build_stable_diffusion_xl(
    unet_config: dict,
    vae_config: dict,
    text_encoder_config: dict,
    text_encoder_2_config: dict,
    *,
    pretrained_model_name_or_path: Optional[str] = None,
    pretrained_components: Sequence[str] = ('vae', 'text_encoder', 'text_encoder_2', 'tokenizer', 'tokenizer_2'),
    caption_drop_prob: float = 0.0,
    train_text_encoder: bool = False,
    train_vae: bool = False,
    val_seed: int = 1138,
    objective: Optional[Union[str, Mapping[str, Any]]] = None,
    **objective_kwargs: Any,
) -> StableDiffusion:
    """An SDXL model: a ``text_time`` UNet with the SDXL text conditioner (two CLIPs, pooled, micro-conditioning).

    Args:
        unet_config (dict): ``UNet2DConditionModel`` config (``addition_embed_type='text_time'``).
        vae_config (dict): ``AutoencoderKL`` config.
        text_encoder_config (dict): ``CLIPTextConfig`` fields of the CLIP ViT-L/14 text tower.
        text_encoder_2_config (dict): ``CLIPTextConfig`` fields of the OpenCLIP ViT-bigG/14 tower (with projection).
        pretrained_model_name_or_path (str, optional): A diffusers SDXL pipeline folder or hub id with the subfolders
            ``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``, ``tokenizer``, ``tokenizer_2``.
        pretrained_components (Sequence[str]): Which components to load from it. Default: all but the UNet.
        caption_drop_prob, train_text_encoder, train_vae, val_seed, objective, **objective_kwargs: As for
            :func:`build_stable_diffusion`; ``train_text_encoder`` covers both encoders.
    """
    check_kwargs(build_stable_diffusion_xl, objective_kwargs, where='model')
    _check_pretrained(pretrained_components if pretrained_model_name_or_path else (), XL_COMPONENTS)
    return _compose(
        {'name': 'unet', 'config': unet_config},
        {
            'name': 'sdxl_clip',
            'text_encoder_config': text_encoder_config,
            'text_encoder_2_config': text_encoder_2_config,
            'caption_drop_prob': caption_drop_prob,
            'train_text_encoder': train_text_encoder,
        },
        vae_config,
        _objective_section(objective, **objective_kwargs),
        pretrained_model_name_or_path,
        pretrained_components,
        conditioner_first=True,
    )(train_vae=train_vae, val_seed=val_seed)


_XL_CONFIGS = ('unet_config', 'vae_config', 'text_encoder_config', 'text_encoder_2_config')


@forwards_kwargs(build_stable_diffusion_xl, exclude=_XL_CONFIGS)
def stable_diffusion_xl(
    unet_config: Optional[dict] = None,
    vae_config: Optional[dict] = None,
    text_encoder_config: Optional[dict] = None,
    text_encoder_2_config: Optional[dict] = None,
    **kwargs: Any,
) -> StableDiffusion:
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
) -> StableDiffusion:
    """A CPU-sized SDXL (two 2-layer text towers, a two-level text_time UNet, tiny VAE).

    See :func:`build_stable_diffusion_xl` for the other arguments.
    """
    return build_stable_diffusion_xl(
        merge_config(TINY_SDXL_UNET_CONFIG, unet_config),
        merge_config(TINY_VAE_CONFIG, vae_config),
        merge_config(TINY_SDXL_TEXT_ENCODER_CONFIG, text_encoder_config),
        merge_config(TINY_SDXL_TEXT_ENCODER_2_CONFIG, text_encoder_2_config),
        **kwargs,
    )


# Denoiser and text-conditioner classes that a diffusers pipeline folder can be read into (see from_pipeline).
PIPELINE_DENOISERS = (UNetDenoiser, MMDiTDenoiser)
PIPELINE_CONDITIONERS = (CLIPTextConditioner, T5TextConditioner, SDXLTextConditioner, SD3TextConditioner)


def pipeline_names() -> list[str]:
    """Names of the diffusers pipeline classes :func:`from_pipeline` reads."""
    return list(dict.fromkeys(cls.pipeline_class.__name__ for cls in PIPELINE_CONDITIONERS))


def objective_from_scheduler(scheduler: Any, inference_scheduler: str = 'ddim') -> Any:
    """The objective a pipeline's scheduler was exported from: rectified flow (with the scheduler's ``shift`` and
    ``num_train_timesteps``) for a flow-matching scheduler, else the DDPM family (prediction type, betas, ... from
    the scheduler config)."""
    flow = next((name for name, cls in FLOW_SCHEDULERS.items() if type(scheduler) is cls), None)
    if flow is not None:
        config = scheduler.config
        return RectifiedFlowObjective(
            shift=float(config.get('shift', 1.0)),
            num_train_timesteps=int(config.get('num_train_timesteps', 1000)),
            inference_scheduler=flow,
        )
    return DDPMObjective(DDPMScheduler.from_config(scheduler.config), inference_scheduler=inference_scheduler)


def from_pipeline(
    pipe: Any, inference_scheduler: str = 'ddim', conditioner_kwargs: Optional[Mapping[str, Any]] = None
) -> StableDiffusion:
    """A :class:`StableDiffusion` sharing the modules of a loaded diffusers pipeline (an export of this project).

    Args:
        pipe (DiffusionPipeline): A ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline`` or
            ``StableDiffusion3Pipeline``.
        inference_scheduler (str): The model's default sampler name (the pipeline's own scheduler's) for the DDPM
            family; a flow-matching scheduler gives the rectified-flow objective and its own name. Default:
            ``'ddim'``.
        conditioner_kwargs (Mapping, optional): Text-conditioner arguments that the pipeline's configs do not hold
            (``use_attention_mask`` of the T5 conditioners, which the export records beside them). ``None`` (a
            folder that records none, e.g. one from the hub): T5 runs unmasked, as in diffusers' pipelines.
    """
    components = {k: v for k, v in pipe.components.items() if v is not None}
    # A StableDiffusionPipeline holds a CLIP or (the t5 conditioner's export) a T5 text encoder.
    t5_text = type(components.get('text_encoder')).__name__ == 'T5EncoderModel'
    conditioner_class = next(
        (c for c in PIPELINE_CONDITIONERS if type(pipe) is c.pipeline_class and (c is T5TextConditioner) == t5_text),
        None,
    )
    if conditioner_class is None:
        raise ValueError(f'Unsupported pipeline {type(pipe).__name__}; supported: {", ".join(pipeline_names())}.')
    denoiser_class = next(d for d in PIPELINE_DENOISERS if d.attribute in components)
    accepted = inspect.signature(conditioner_class).parameters
    if conditioner_kwargs is None and 'use_attention_mask' in accepted:
        conditioner_kwargs = {'use_attention_mask': False}  # no record: a diffusers folder, whose T5 runs unmasked
    extra = {k: v for k, v in (conditioner_kwargs or {}).items() if k in accepted}
    conditioner = conditioner_class(**{k: v for k, v in components.items() if k in accepted}, **extra)
    objective = objective_from_scheduler(pipe.scheduler, inference_scheduler)
    return StableDiffusion(denoiser_class(components[denoiser_class.attribute]), pipe.vae, conditioner, objective)
