"""Named registries that configs use to pick models, data, optimizers, algorithms, callbacks and loggers, and
the model components' registries (denoisers, text conditioners, objectives, adapters), listed here together.

Built on ``catalogue`` (already a dependency of mosaicml-streaming), which also exposes each registry as a
Python entry-point group (``diffusion_<registry>``) so that third-party packages can add their own entries
without touching this repository. The registries are seeded with Composer's own components so that a yaml can
name theirs and ours alike.

A yaml section maps a registry name to the keyword arguments of its builder, for example::

    algorithms:
      ema: {half_life: 100ba, ema_start: 0.1dur}
      low_precision_groupnorm: {}

Every build goes through :meth:`Registry.build`, which checks the keyword names against the builder's
signature first, so a misspelled key fails before anything is constructed and the error lists the valid keys.
"""

from __future__ import annotations

import torch
from composer import algorithms as composer_algorithms
from composer import callbacks as composer_callbacks
from composer import loggers as composer_loggers
from composer import optim as composer_optim

from diffusion import algorithms as our_algorithms
from diffusion import callbacks as our_callbacks
from diffusion.data.image_caption import build_image_caption_dataloader
from diffusion.data.latents import build_latent_dataloader
from diffusion.data.replaced_sample_monitor import ReplacedSampleMonitor
from diffusion.models import autoencoder, factories, sd3_factories
from diffusion.models.registries import adapters, denoisers, objectives, text_conditioners
from diffusion.optim import adamw_8bit
from diffusion.utils import Registry

__all__ = [
    'Registry',
    'adapters',
    'algorithms',
    'callbacks',
    'dataloaders',
    'denoisers',
    'loggers',
    'models',
    'objectives',
    'optimizers',
    'schedulers',
    'text_conditioners',
]


models = Registry('models', 'Builders of ComposerModels (diffusion models, autoencoders).')
dataloaders = Registry('dataloaders', 'Builders of training/eval dataloaders from streaming shards.')
optimizers = Registry('optimizers', 'Builders of torch optimizers taking the trainable parameters as `params`.')
schedulers = Registry('schedulers', 'Composer learning-rate schedulers.')
algorithms = Registry('algorithms', 'Composer Algorithms (speedups and training methods) switched on from yaml.')
callbacks = Registry('callbacks', 'Composer Callbacks (monitoring, image logging, evaluation, export).')
loggers = Registry('loggers', 'Composer LoggerDestinations (file, TensorBoard, W&B, MLflow, ...).')

# Composer's own components under the snake_case names of its docs, and this package's.
algorithms.register_all(
    {
        # Composer's EMA (ema_start for scheduled EMA), made to work with an FSDP-sharded UNet.
        'ema': our_algorithms.ShardedEMA,
        'low_precision_groupnorm': composer_algorithms.LowPrecisionGroupNorm,
        'low_precision_layernorm': composer_algorithms.LowPrecisionLayerNorm,
        'channels_last': composer_algorithms.ChannelsLast,
        'gradient_clipping': composer_algorithms.GradientClipping,
        'attention_backend': our_algorithms.AttentionBackend,
        'gradient_checkpointing': our_algorithms.GradientCheckpointing,
        'compile_denoiser': our_algorithms.CompileDenoiser,
        'compile_unet': our_algorithms.CompileDenoiser,  # its name before the denoiser became a component
    }
)
callbacks.register_all(
    {
        'speed_monitor': composer_callbacks.SpeedMonitor,
        'lr_monitor': composer_callbacks.LRMonitor,
        'memory_monitor': composer_callbacks.MemoryMonitor,
        'nan_monitor': composer_callbacks.NaNMonitor,
        # NaNMonitor extended: inf and gradients too, the same decision on every rank, skip or stop.
        'nan_guard': our_callbacks.NaNGuard,
        # Counts samples the datasets replaced (undecodable, empty caption, non-finite latents); stops over a cap.
        'replaced_sample_monitor': ReplacedSampleMonitor,
        'optimizer_monitor': composer_callbacks.OptimizerMonitor,
        'runtime_estimator': composer_callbacks.RuntimeEstimator,
        'log_diffusion_images': our_callbacks.LogDiffusionImages,
        'prompt_following': our_callbacks.PromptFollowing,
        # FID, KID and CLIP score of samples drawn on every rank at an interval (torchmetrics).
        'image_metrics': our_callbacks.ImageMetrics,
        'sample_ledger': our_callbacks.SampleLedger,
        'save_pretrained': our_callbacks.SavePretrained,
    }
)
loggers.register_all(
    {
        # Composer's FileLogger, without the progress bar's redraws glued into the log's metric lines.
        'file': our_callbacks.FileLogger,
        'tensorboard': composer_loggers.TensorboardLogger,
        'wandb': composer_loggers.WandBLogger,
        'mlflow': composer_loggers.MLFlowLogger,
    }
)
schedulers.register_all(
    {
        'constant': composer_optim.ConstantScheduler,
        'constant_with_warmup': composer_optim.ConstantWithWarmupScheduler,
        'linear_with_warmup': composer_optim.LinearWithWarmupScheduler,
        'cosine_with_warmup': composer_optim.CosineAnnealingWithWarmupScheduler,
        'multistep_with_warmup': composer_optim.MultiStepWithWarmupScheduler,
    }
)
optimizers.register_all(
    {
        'adamw': torch.optim.AdamW,
        'decoupled_adamw': composer_optim.DecoupledAdamW,
        # bitsandbytes' 8-bit AdamW (CUDA only, the optional `bnb` extra); refused in one line elsewhere.
        'adamw_8bit': adamw_8bit,
    }
)
models.register_all(
    {
        # Compose any denoiser, text conditioner and objective by name (model.denoiser: {name: ...}, ...).
        'latent_diffusion': factories.latent_diffusion,
        'stable_diffusion_2': factories.stable_diffusion_2,
        'tiny_stable_diffusion': factories.tiny_stable_diffusion,
        'stable_diffusion_xl': factories.stable_diffusion_xl,
        'tiny_stable_diffusion_xl': factories.tiny_stable_diffusion_xl,
        'stable_diffusion_3': sd3_factories.stable_diffusion_3,
        'tiny_stable_diffusion_3': sd3_factories.tiny_stable_diffusion_3,
        'autoencoder_kl': autoencoder.autoencoder_kl,
        'tiny_autoencoder': autoencoder.tiny_autoencoder,
    }
)
dataloaders.register_all({'image_caption': build_image_caption_dataloader, 'latents': build_latent_dataloader})

# The config section that names entries of each registry, in the order a reader meets them.
CONFIG_SECTIONS = {
    'model': models,
    'model.denoiser': denoisers,
    'model.text_conditioner': text_conditioners,
    'model.objective': objectives,
    'model.adapters': adapters,
    'train_dataloader, eval_dataloader': dataloaders,
    'optimizer': optimizers,
    'scheduler': schedulers,
    'algorithms': algorithms,
    'callbacks': callbacks,
    'loggers': loggers,
}


def registry_table() -> str:
    """Every registry's names as the Markdown table in README.md (a test keeps the two the same)."""
    rows = ['| section | registry | names |', '|---|---|---|']
    for section, reg in CONFIG_SECTIONS.items():
        names = ', '.join(f'`{name}`' for name in reg.names()) or '(none built in; see "Add a component")'
        rows.append(f'| `{section}` | {reg.name} | {names} |')
    return '\n'.join(rows)


if __name__ == '__main__':
    print(registry_table())
