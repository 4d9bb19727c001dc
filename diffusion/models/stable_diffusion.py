"""The latent diffusion model as a Composer model, composed of a denoiser, an autoencoder, a text conditioner and an
objective.

Builds on Composer's ``ComposerModel`` contract (``forward``, ``loss``, ``eval_forward``, ``get_metrics``), on
diffusers for the networks (``UNet2DConditionModel``, ``AutoencoderKL``) and for sampling (the family's diffusers
pipeline runs classifier-free guidance for ``generate``), and on transformers for the text encoders. Parallelism,
precision and checkpointing are applied from outside by the Composer Trainer.

One class serves every family. What varies is a component, each in its own module with a registry of its own:

- the *denoiser* (:mod:`diffusion.models.denoisers`): the network, its FSDP units, FLOPs and native size;
- the *text conditioner* (:mod:`diffusion.models.conditioners`): captions -> tokens -> conditioning; SD2's CLIP,
  SDXL's two CLIPs with pooled embeddings and micro-conditioning;
- the *objective* (:mod:`diffusion.models.objectives`): noising, target, timesteps, loss weights, validation
  timesteps and the inference scheduler (the DDPM family);
- *adapters* (:mod:`diffusion.models.adapters`), applied to the built model before the optimizer sees it.

The networks are held under the names a diffusers pipeline gives them (``unet``, ``vae``, ``text_encoder``,
``text_encoder_2``), so checkpoints keep the same state-dict keys whatever the family. Batch keys are those of
:mod:`diffusion.data.batch`. Latents in a batch are never scaled: the autoencoder's shift and scaling factor
(``(z - shift_factor) * scaling_factor``; SD3's 16-channel VAE has a shift, the SD VAE none) are applied in
:meth:`StableDiffusion.scale_latents` and nowhere else (scaling in a precompute script and again in the model is a
known way to train on wrong latents), and undone in :meth:`StableDiffusion.unscale_latents` where this code
decodes.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from composer.models import ComposerModel
from diffusers import AutoencoderKL
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor
from torchmetrics import MeanSquaredError, Metric

from diffusion.data.batch import IMAGE_LATENT_KEYS
from diffusion.models.conditioners import TextConditioner
from diffusion.models.denoisers import Denoiser
from diffusion.models.objectives import NoisedBatch, Objective
from diffusion.utils import ConfigError

__all__ = ['StableDiffusion']


class StableDiffusion(ComposerModel):
    """A latent diffusion model: denoiser + autoencoder + text conditioner + objective.

    Args:
        denoiser (Denoiser): The network to train, bound in a :class:`~diffusion.models.denoisers.Denoiser`.
        vae (AutoencoderKL): Image autoencoder; latents are shifted by ``vae.config.shift_factor`` (when set) and
            scaled by ``vae.config.scaling_factor`` in :meth:`scale_latents`, and nowhere else.
        conditioner (TextConditioner): Text encoders, tokenizers and caption dropout.
        objective (Objective): The training objective and its inference scheduler.
        train_vae (bool): Train the VAE decoder and encoder too. Default: ``False``.
        val_seed (int): Seed of the validation noise. Default: ``1138``.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        vae: AutoencoderKL,
        conditioner: TextConditioner,
        objective: Objective,
        *,
        train_vae: bool = False,
        val_seed: int = 1138,
    ):
        super().__init__()
        denoiser.check_conditioning(conditioner.conditioning_shapes())
        _check_latent_channels(denoiser, vae)
        if conditioner.pipeline_applies_shift_factor and vae.config.get('shift_factor') is None:
            # SD3's pipeline adds the shift when it decodes and fails on None: an unshifted VAE (e.g. the demo's)
            # says 0.0, which leaves every latent as it was.
            vae.register_to_config(shift_factor=0.0)
        self._denoiser_class = type(denoiser)
        setattr(self, denoiser.attribute, denoiser.network)
        self.vae = vae
        conditioner.attach(self)
        self.conditioner = conditioner
        self.objective = objective
        self.adapters: list[Any] = []  # applied by diffusion.models.adapters.apply_adapters
        self.train_vae = train_vae
        self.val_seed = val_seed
        self.vae.requires_grad_(train_vae)
        self.train()

    # -- nn.Module ----------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> StableDiffusion:
        """Keep frozen encoders in eval mode so that dropout or norm statistics never change them."""
        super().train(mode)
        self.vae.train(mode and self.train_vae)
        for encoder in self.conditioner.encoders():
            encoder.train(mode and self.conditioner.train_text_encoder)
        return self

    @property
    def denoiser(self) -> Denoiser:
        """The denoiser bound to the network the model holds now (the FSDP wrapper, once Composer has set one)."""
        return self._denoiser_class(getattr(self, self._denoiser_class.attribute))

    def frozen_encoders(self) -> list[torch.nn.Module]:
        """The autoencoder and text encoders: the parts precompute runs, and that train only when asked."""
        return [self.vae, *self.conditioner.encoders()]

    @property
    def latent_scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def latent_shift_factor(self) -> float:
        """The VAE's ``shift_factor`` (the latents' mean, subtracted before scaling); 0 when it has none."""
        return float(self.vae.config.get('shift_factor') or 0.0)

    @property
    def resolution_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE factor times the denoiser's patch size (if it has one)."""
        return self.vae_scale_factor * int(getattr(self.denoiser, 'patch_size', 1))

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each side (8 for the SD VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_image_size(self) -> int:
        """The pipeline's default side in pixels: the denoiser's sample size times the autoencoder factor."""
        return self.denoiser.sample_size * self.vae_scale_factor

    # -- latents -------------------------------------------------------------------------------------------------
    def vae_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation (B, C, H/f, W/f) of the VAE posterior, unscaled, in fp32.

        Encodes in fp32 with autocast off: the SD VAE overflows in fp16, and latents encoded in low precision
        differ from the ones sampling decodes. Precomputing latents stores exactly these moments.
        """
        with torch.set_grad_enabled(self.train_vae and torch.is_grad_enabled()):
            with torch.autocast(images.device.type, enabled=False):
                vae_dtype = next(self.vae.parameters()).dtype
                posterior = self.vae.encode(images.to(vae_dtype)).latent_dist
        return posterior.mean.float(), posterior.std.float()

    @staticmethod
    def sample_latents(
        mean: torch.Tensor, std: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """A sample of the posterior, drawn exactly as diffusers' ``DiagonalGaussianDistribution.sample`` draws it,
        so latents from the VAE and from precomputed moments agree for the same random state."""
        return mean + std * randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """``(z - shift_factor) * scaling_factor`` of VAE latents: the one place where shift and factor are applied."""
        shift = self.latent_shift_factor
        latents = latents.float()
        # Without a shift the SD and SDXL latents are computed exactly as before shift factors existed.
        return (latents - shift if shift else latents) * self.latent_scaling_factor

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`scale_latents`: what the VAE decoder takes."""
        return latents.float() / self.latent_scaling_factor + self.latent_shift_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1], float32, from scaled latents; decoded in fp32 like :meth:`vae_moments`."""
        with torch.autocast(latents.device.type, enabled=False):
            vae_dtype = next(self.vae.parameters()).dtype
            images = self.vae.decode(self.unscale_latents(latents).to(vae_dtype)).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Scaled latents (B, C, H/f, W/f): a sample of the VAE posterior times the scaling factor."""
        return self.scale_latents(self.sample_latents(*self.vae_moments(images), generator=generator))

    def _latents(self, batch: dict[str, Any], generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Scaled latents from whichever the batch holds: a latent sample, the posterior's moments, or images."""
        if any(key in batch for key in IMAGE_LATENT_KEYS) and self.train_vae:
            raise ValueError('Precomputed image latents cannot train the VAE; set train_vae=false.')
        if 'image_latents' in batch:
            return self.scale_latents(batch['image_latents'])
        if 'image_latents_mean' in batch:
            mean, std = batch['image_latents_mean'], batch['image_latents_std']
            return self.scale_latents(self.sample_latents(mean.float(), std.float(), generator=generator))
        if 'image' not in batch:
            raise KeyError(f'Batch needs "image", "image_latents" or "image_latents_mean"; it has {sorted(batch)}.')
        return self.encode_images(batch['image'], generator=generator)

    def conditioning(self, batch: dict[str, Any], drop_captions: bool, latents: torch.Tensor) -> dict[str, Any]:
        """The text conditioner's output for ``batch``, on the latents' device."""
        image_size = (latents.shape[-2] * self.vae_scale_factor, latents.shape[-1] * self.vae_scale_factor)
        conditioning = self.conditioner.conditioning(batch, drop_captions, image_size)
        return {key: value.to(latents.device) for key, value in conditioning.items()}

    # -- ComposerModel -------------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Noise the latents at random timesteps and predict; returns (prediction, target, timesteps)."""
        latents = self._latents(batch)
        conditioning = self.conditioning(batch, self.training, latents)
        timesteps = self.objective.sample_timesteps(latents.shape[0], latents.device)
        noised = self.objective.noise(latents, timesteps)
        return self._predict(noised, conditioning)

    def _predict(self, noised: NoisedBatch, conditioning: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        prediction = self.denoiser(noised.noisy_latents, noised.timesteps, conditioning)
        return prediction, noised.target, noised.timesteps

    def loss(self, outputs: tuple[torch.Tensor, ...], batch: dict[str, Any]) -> torch.Tensor:
        """Mean squared error to the target, per sample weighted by the objective (min-SNR-gamma, ...)."""
        prediction, target, timesteps = outputs
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction='none').mean(dim=(1, 2, 3))
        weights = self.objective.loss_weights(timesteps)
        if weights is not None:
            per_sample = per_sample * weights
        return per_sample.mean()

    def eval_forward(self, batch: dict[str, Any], outputs: Optional[Any] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions and targets at the objective's fixed validation timesteps with seeded noise, stacked."""
        if outputs is not None:
            return outputs[0], outputs[1]
        device = self.denoiser.device
        generator = torch.Generator(device=device).manual_seed(self.val_seed)
        latents = self._latents(batch, generator=generator)
        conditioning = self.conditioning(batch, False, latents)
        predictions, targets = [], []
        for t in self.objective.validation_timesteps(device):
            timesteps = t.expand(latents.shape[0]).clone()
            noised = self.objective.noise(latents, timesteps, generator=generator)
            prediction, target, _ = self._predict(noised, conditioning)
            predictions.append(prediction)
            targets.append(target)
        return torch.cat(predictions), torch.cat(targets)

    def flops_per_batch(self, batch: dict[str, Any]) -> int:
        """Denoiser training FLOPs for ``batch`` (forward + backward, about 3x the forward), for SpeedMonitor's MFU.

        The encoders are not counted: with precomputed latents they do not run, and MFU is quoted for the denoiser.
        """
        latents = next((batch[key] for key in IMAGE_LATENT_KEYS if key in batch), None)
        if latents is not None:
            batch_size, latent_shape = latents.shape[0], tuple(latents.shape[1:])
        else:
            images, factor = batch['image'], self.vae_scale_factor
            channels = self.vae.config.latent_channels
            batch_size, latent_shape = images.shape[0], (channels, images.shape[2] // factor, images.shape[3] // factor)
        return 3 * batch_size * self.denoiser.forward_flops(latent_shape, self.conditioner.conditioning_shapes())

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        # Training loss is already logged by the trainer; validation loss at fixed timesteps is the metric.
        return {} if is_train else {'MeanSquaredError': MeanSquaredError()}

    def update_metric(self, batch: Any, outputs: Any, metric: Metric) -> None:
        metric.update(outputs[0].float(), outputs[1].float())

    # -- sampling ------------------------------------------------------------------------------------------------
    def pipeline(self, scheduler: Optional[str] = None) -> DiffusionPipeline:
        """The family's diffusers pipeline sharing this model's modules (no copies), for sampling and export."""
        components = {
            self._denoiser_class.attribute: getattr(self, self._denoiser_class.attribute),
            'vae': self.vae,
            **self.conditioner.components(),
        }
        return self.conditioner.pipeline_class(
            **components, scheduler=self.objective.inference_scheduler(scheduler), **self.conditioner.pipeline_kwargs()
        )

    def _generators(
        self, seed: Optional[Union[int, Sequence[int]]], num_images: int
    ) -> Optional[Union[torch.Generator, list[torch.Generator]]]:
        """One generator for the batch (an int seed), one per image (a list of seeds), or none."""
        device = self.denoiser.device
        if seed is None:
            return None
        if isinstance(seed, int):
            return torch.Generator(device=device).manual_seed(seed)
        seeds = [int(s) for s in seed]
        if len(seeds) != num_images:
            raise ValueError(f'Got {len(seeds)} seeds for {num_images} images; give one seed per image or one int.')
        return [torch.Generator(device=device).manual_seed(s) for s in seeds]

    @torch.no_grad()
    def generate(
        self,
        prompts: Union[str, Sequence[str]],
        negative_prompts: Optional[Union[str, Sequence[str]]] = None,
        guidance_scale: float = 7.5,
        num_inference_steps: int = 50,
        seed: Optional[Union[int, Sequence[int]]] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        scheduler: Optional[str] = None,
        num_images_per_prompt: int = 1,
        progress_bar: bool = False,
        **conditioning: Any,
    ) -> torch.Tensor:
        """Sample images with classifier-free guidance.

        Args:
            prompts (str | Sequence[str]): Text prompts.
            negative_prompts (str | Sequence[str], optional): Prompts to guide away from (default: empty).
            guidance_scale (float): Classifier-free guidance scale; 1 disables guidance. Default: ``7.5``.
            num_inference_steps (int): Number of sampler steps. Default: ``50``.
            seed (int | Sequence[int], optional): Seed of the initial noise. An int seeds one generator for the
                batch (the same seed and batch give the same images); a list gives one seed per output image
                (``len(prompts) * num_images_per_prompt``, prompt-major), so that an image depends only on its
                prompt and seed, not on the rest of the batch.
            height (int, optional): Image height in pixels; default: the UNet's sample size times the VAE factor.
            width (int, optional): Image width in pixels; default as ``height``.
            scheduler (str, optional): Sampler name (``'ddim'``, ``'euler'``, ``'dpm++'``, ...); default: the
                objective's default (``inference_scheduler`` of the model config).
            num_images_per_prompt (int): Images per prompt. Default: ``1``.
            progress_bar (bool): Show the sampler's progress bar. Default: ``False``.
            **conditioning: Model-specific sampling conditioning (SDXL: ``original_size``,
                ``crops_coords_top_left``, ``target_size``); the SD2 family takes none.

        Returns:
            torch.Tensor: Images (B * num_images_per_prompt, 3, H, W) in [0, 1], float32, on the model's device.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if isinstance(negative_prompts, str):
            negative_prompts = [negative_prompts] * len(prompts)
        elif negative_prompts is not None and len(negative_prompts) != len(prompts):
            raise ValueError(f'Got {len(negative_prompts)} negative prompts for {len(prompts)} prompts.')
        extra = self.conditioner.pipeline_call_kwargs(**conditioning)
        # The SD and SDXL pipelines decode without the VAE's shift_factor: with one, they return latents and the
        # model decodes them (unscale_latents), so that a shifted VAE samples correctly with any pipeline.
        decode_here = self.latent_shift_factor != 0.0 and not self.conditioner.pipeline_applies_shift_factor
        generator = self._generators(seed, len(prompts) * num_images_per_prompt)
        was_training = self.training
        self.eval()
        try:
            pipe = self.pipeline(scheduler)
            pipe.set_progress_bar_config(disable=not progress_bar)
            images = pipe(
                **self.conditioner.pipeline_prompt_kwargs(prompts, negative_prompts, num_images_per_prompt),
                guidance_scale=guidance_scale,
                num_inference_steps=num_inference_steps,
                height=height,
                width=width,
                generator=generator,
                output_type='latent' if decode_here else 'pt',
                **extra,
            ).images
            if decode_here:
                images = self.decode_latents(images)
        finally:
            self.train(was_training)
        return images.float()


def _check_latent_channels(denoiser: Denoiser, vae: AutoencoderKL) -> None:
    """Fail before training, in one line naming the keys, when the denoiser's channels are not the VAE's latents'."""
    latent_channels = int(vae.config.latent_channels)
    out_channels = int(getattr(denoiser.config, 'out_channels', None) or denoiser.in_channels)
    if denoiser.in_channels != latent_channels or out_channels != latent_channels:
        raise ConfigError(
            f'Latent channel mismatch: model.vae_config.latent_channels={latent_channels} (the autoencoder) but the '
            f'denoiser ({denoiser.attribute}) has in_channels={denoiser.in_channels}, out_channels={out_channels}; '
            "set the denoiser config's in_channels and out_channels to the VAE's latent_channels."
        )


def get_denoiser(model: torch.nn.Module, caller: str) -> Denoiser:
    """The denoiser of ``model`` (a :class:`StableDiffusion`, also inside a DDP wrapper).

    Args:
        model (torch.nn.Module): The model an algorithm or callback was given.
        caller (str): Name of the caller, for the error message.
    """
    model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    if not isinstance(model, StableDiffusion):
        raise ValueError(f'{caller} needs a diffusion model with a denoiser; got {type(model).__name__}.')
    return model.denoiser
