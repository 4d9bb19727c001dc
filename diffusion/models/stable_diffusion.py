"""The Stable Diffusion 2 family as a Composer model: a latent diffusion UNet trained on frozen VAE and text encoders.

Builds on Composer's ``ComposerModel`` contract (``forward``, ``loss``, ``eval_forward``, ``get_metrics``), on
diffusers for the networks (``UNet2DConditionModel``, ``AutoencoderKL``), the noise schedules and sampling
(``StableDiffusionPipeline`` runs classifier-free guidance for ``generate``), and on transformers for the CLIP
text encoder. Parallelism, precision and checkpointing are applied from outside by the Composer Trainer.

Batch keys (see shared/ARCHITECTURE.md): ``image`` (B, 3, H, W) in [-1, 1] and ``input_ids`` (B, 77) or
``captions`` (list of B strings). Batches of precomputed latents skip the VAE and the text encoder: they hold
``image_latents_mean`` and ``image_latents_std`` (B, 4, H/8, W/8, the VAE posterior's moments, sampled here with the
same draw the VAE path makes) or ``image_latents`` (a sample), and ``text_embeds`` (B, 77, D). Latents in a batch
are never scaled: the VAE scaling factor is applied in :meth:`StableDiffusion.scale_latents` and nowhere else
(scaling in a precompute script and again in the model is a known way to train on wrong latents).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from composer.models import ComposerModel
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor
from torchmetrics import MeanSquaredError, Metric
from transformers import CLIPTextModel, CLIPTokenizer

from diffusion.models.flops import unet_forward_flops
from diffusion.models.noise import build_inference_scheduler, min_snr_weights, signal_to_noise_ratio, training_target

__all__ = ['StableDiffusion']


class StableDiffusion(ComposerModel):
    """Latent diffusion model of the SD2 family.

    Args:
        unet (UNet2DConditionModel): The denoiser; the only part trained by default.
        vae (AutoencoderKL): Image autoencoder; latents are scaled by ``vae.config.scaling_factor`` in
            :meth:`scale_latents`, and nowhere else.
        text_encoder (CLIPTextModel): Caption encoder; its last hidden state conditions the UNet.
        tokenizer (CLIPTokenizer): Tokenizer of the text encoder.
        noise_scheduler (DDPMScheduler): Training noise schedule; its ``prediction_type`` sets the target.
        inference_scheduler (str): Default sampler for ``generate``: ``'ddim'``, ``'euler'``, ``'dpm++'``, ...
            Default: ``'ddim'``.
        caption_drop_prob (float): Fraction of training captions replaced by the empty caption, which
            teaches the unconditional prediction used by classifier-free guidance. Default: ``0.0``.
        offset_noise (float): Scale of per-channel constant noise added to the training noise, which lets
            the model change an image's mean brightness. Default: ``0.0``.
        min_snr_gamma (float, optional): Gamma of min-SNR loss weighting; ``None`` for uniform weights.
        train_text_encoder (bool): Train the text encoder too. Default: ``False``.
        train_vae (bool): Train the VAE decoder and encoder too. Default: ``False``.
        val_timesteps (int): Number of evenly spaced timesteps at which validation loss is measured, with a
            fixed noise seed, so that validation losses are comparable across evaluations. Default: ``10``.
        val_seed (int): Seed of the validation noise. Default: ``1138``.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        noise_scheduler: DDPMScheduler,
        *,
        inference_scheduler: str = 'ddim',
        caption_drop_prob: float = 0.0,
        offset_noise: float = 0.0,
        min_snr_gamma: Optional[float] = None,
        train_text_encoder: bool = False,
        train_vae: bool = False,
        val_timesteps: int = 10,
        val_seed: int = 1138,
    ):
        super().__init__()
        if not 0.0 <= caption_drop_prob <= 1.0:
            raise ValueError(f'caption_drop_prob must be in [0, 1], got {caption_drop_prob}.')
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ValueError(f'min_snr_gamma must be positive or None, got {min_snr_gamma}.')
        build_inference_scheduler(inference_scheduler, noise_scheduler)  # validates the name early
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.noise_scheduler = noise_scheduler
        self.inference_scheduler = inference_scheduler
        self.caption_drop_prob = caption_drop_prob
        self.offset_noise = offset_noise
        self.min_snr_gamma = min_snr_gamma
        self.train_text_encoder = train_text_encoder
        self.train_vae = train_vae
        self.val_seed = val_seed
        num_steps = noise_scheduler.config.num_train_timesteps
        self.register_buffer(
            'val_timesteps', torch.linspace(0, num_steps - 1, val_timesteps).round().long(), persistent=False
        )
        self.vae.requires_grad_(train_vae)
        self.text_encoder.requires_grad_(train_text_encoder)
        self._empty_text_embeds: Optional[torch.Tensor] = None  # computed once, for caption dropout on text_embeds
        self.train()

    # -- nn.Module ----------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> StableDiffusion:
        """Keep frozen encoders in eval mode so that dropout or norm statistics never change them."""
        super().train(mode)
        self.vae.train(mode and self.train_vae)
        self.text_encoder.train(mode and self.train_text_encoder)
        return self

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def latent_scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    # -- encoders ------------------------------------------------------------------------------------------------
    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """Token ids (B, 77) padded to the tokenizer's maximum length, as SD2 pads them."""
        return self.tokenizer(
            list(captions),
            padding='max_length',
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors='pt',
        ).input_ids

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Text embeddings (B, 77, D): the text encoder's last hidden state (no attention mask, as in SD2)."""
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            return self.text_encoder(input_ids.to(self.text_encoder.device))[0]

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
        """VAE latents times the scaling factor: the one place where the factor is applied."""
        return latents.float() * self.latent_scaling_factor

    def encode_images(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Scaled latents (B, C, H/f, W/f): a sample of the VAE posterior times the scaling factor."""
        return self.scale_latents(self.sample_latents(*self.vae_moments(images), generator=generator))

    def _drop_mask(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """Which rows lose their caption; the same draw for token ids and for precomputed embeddings."""
        return torch.rand(batch_size, device=device) < self.caption_drop_prob

    def _drop_captions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Replace a ``caption_drop_prob`` fraction of rows by the empty caption's ids."""
        if self.caption_drop_prob == 0.0:
            return input_ids
        drop = self._drop_mask(input_ids.shape[0], input_ids.device)
        empty = self.tokenize(['']).to(input_ids.device).expand_as(input_ids)
        return torch.where(drop[:, None], empty, input_ids)

    def _drop_text_embeds(self, text_embeds: torch.Tensor) -> torch.Tensor:
        """Replace a ``caption_drop_prob`` fraction of rows by the empty caption's embedding (encoded once)."""
        if self.caption_drop_prob == 0.0:
            return text_embeds
        drop = self._drop_mask(text_embeds.shape[0], text_embeds.device)
        if self._empty_text_embeds is None:
            with torch.no_grad():
                self._empty_text_embeds = self.encode_text(self.tokenize(['']))
        empty = self._empty_text_embeds.to(text_embeds.device, text_embeds.dtype).expand_as(text_embeds)
        return torch.where(drop[:, None, None], empty, text_embeds)

    def _conditioning(self, batch: dict[str, Any], drop_captions: bool) -> torch.Tensor:
        if 'text_embeds' in batch:
            if self.train_text_encoder:
                raise ValueError('Precomputed text_embeds cannot train the text encoder; set train_text_encoder=false.')
            text_embeds = batch['text_embeds']
            return self._drop_text_embeds(text_embeds) if drop_captions else text_embeds
        input_ids = batch['input_ids'] if 'input_ids' in batch else self.tokenize(batch['captions'])
        input_ids = input_ids.to(self.unet.device)
        if drop_captions:
            input_ids = self._drop_captions(input_ids)
        return self.encode_text(input_ids)

    def _unet_conditioning(self, batch: dict[str, Any], drop_captions: bool, latents: torch.Tensor) -> dict[str, Any]:
        """Keyword arguments of the UNet besides latents and timesteps: the text context for the SD2 family."""
        return {'encoder_hidden_states': self._conditioning(batch, drop_captions)}

    def text_embeddings(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """The columns that precomputing stores for ``captions``: ``text_embeds`` (B, 77, D) for the SD2 family."""
        return {'text_embeds': self.encode_text(self.tokenize(captions))}

    def _latents(self, batch: dict[str, Any], generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Scaled latents from whichever the batch holds: a latent sample, the posterior's moments, or images."""
        if ('image_latents' in batch or 'image_latents_mean' in batch) and self.train_vae:
            raise ValueError('Precomputed image latents cannot train the VAE; set train_vae=false.')
        if 'image_latents' in batch:
            return self.scale_latents(batch['image_latents'])
        if 'image_latents_mean' in batch:
            mean, std = batch['image_latents_mean'], batch['image_latents_std']
            return self.scale_latents(self.sample_latents(mean.float(), std.float(), generator=generator))
        if 'image' not in batch:
            raise KeyError(f'Batch needs "image", "image_latents" or "image_latents_mean"; it has {sorted(batch)}.')
        return self.encode_images(batch['image'], generator=generator)

    # -- ComposerModel -------------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Noise the latents at random timesteps and predict; returns (prediction, target, timesteps)."""
        latents = self._latents(batch)
        conditioning = self._unet_conditioning(batch, self.training, latents)
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
        )
        return self._predict(latents, conditioning, timesteps, noise=torch.randn_like(latents))

    def _predict(
        self,
        latents: torch.Tensor,
        conditioning: Union[torch.Tensor, dict[str, Any]],
        timesteps: torch.Tensor,
        noise: torch.Tensor,
        offset: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.offset_noise > 0:
            if offset is None:
                offset = torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device)
            noise = noise + self.offset_noise * offset.to(noise.dtype)
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = training_target(self.noise_scheduler, latents, noise, timesteps)
        if isinstance(conditioning, torch.Tensor):
            conditioning = {'encoder_hidden_states': conditioning}
        prediction = self.unet(noisy_latents, timesteps, **conditioning).sample
        return prediction, target, timesteps

    def loss(self, outputs: tuple[torch.Tensor, ...], batch: dict[str, Any]) -> torch.Tensor:
        """Mean squared error to the target, per sample weighted by min-SNR-gamma when configured."""
        prediction, target, timesteps = outputs
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction='none').mean(dim=(1, 2, 3))
        if self.min_snr_gamma is not None:
            snr = signal_to_noise_ratio(self.noise_scheduler, timesteps)
            per_sample = per_sample * min_snr_weights(snr, self.min_snr_gamma, self.prediction_type)
        return per_sample.mean()

    def eval_forward(self, batch: dict[str, Any], outputs: Optional[Any] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions and targets at the fixed validation timesteps with seeded noise, stacked over timesteps."""
        if outputs is not None:
            return outputs[0], outputs[1]
        device = self.unet.device
        generator = torch.Generator(device=device).manual_seed(self.val_seed)
        latents = self._latents(batch, generator=generator)
        conditioning = self._unet_conditioning(batch, False, latents)
        predictions, targets = [], []
        for t in self.val_timesteps.tolist():
            noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
            offset = torch.randn(latents.shape[:2] + (1, 1), generator=generator, device=device)
            timesteps = torch.full((latents.shape[0],), t, device=device, dtype=torch.long)
            prediction, target, _ = self._predict(latents, conditioning, timesteps, noise, offset)
            predictions.append(prediction)
            targets.append(target)
        return torch.cat(predictions), torch.cat(targets)

    def flops_per_batch(self, batch: dict[str, Any]) -> int:
        """UNet training FLOPs for ``batch`` (forward + backward, about 3x the forward), for SpeedMonitor's MFU.

        The encoders are not counted: with precomputed latents they do not run, and MFU is quoted for the UNet.
        """
        if 'image_latents_mean' in batch or 'image_latents' in batch:
            latents = batch.get('image_latents_mean', batch.get('image_latents'))
            batch_size, latent_shape = latents.shape[0], tuple(latents.shape[1:])
        else:
            images = batch['image']
            factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
            channels = self.vae.config.latent_channels
            batch_size, latent_shape = images.shape[0], (channels, images.shape[2] // factor, images.shape[3] // factor)
        text_shape = (self.tokenizer.model_max_length, self.unet.config.cross_attention_dim)
        return 3 * batch_size * unet_forward_flops(self.unet.config, latent_shape, text_shape)

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        # Training loss is already logged by the trainer; validation loss at fixed timesteps is the metric.
        return {} if is_train else {'MeanSquaredError': MeanSquaredError()}

    def update_metric(self, batch: Any, outputs: Any, metric: Metric) -> None:
        metric.update(outputs[0].float(), outputs[1].float())

    # -- sampling ------------------------------------------------------------------------------------------------
    def pipeline(self, scheduler: Optional[str] = None) -> StableDiffusionPipeline:
        """A diffusers pipeline sharing this model's modules (no copies), for sampling and export."""
        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=build_inference_scheduler(scheduler or self.inference_scheduler, self.noise_scheduler),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def _generators(
        self, seed: Optional[Union[int, Sequence[int]]], num_images: int
    ) -> Optional[Union[torch.Generator, list[torch.Generator]]]:
        """One generator for the batch (an int seed), one per image (a list of seeds), or none."""
        device = self.unet.device
        if seed is None:
            return None
        if isinstance(seed, int):
            return torch.Generator(device=device).manual_seed(seed)
        seeds = [int(s) for s in seed]
        if len(seeds) != num_images:
            raise ValueError(f'Got {len(seeds)} seeds for {num_images} images; give one seed per image or one int.')
        return [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def _pipeline_call_kwargs(self, **kwargs: Any) -> dict[str, Any]:
        """Extra pipeline arguments of a subclass (SDXL's size and crop conditioning); the SD2 family has none."""
        if kwargs:
            raise TypeError(f'{type(self).__name__}.generate got unexpected arguments {sorted(kwargs)}.')
        return {}

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
                model's ``inference_scheduler``.
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
        extra = self._pipeline_call_kwargs(**conditioning)
        generator = self._generators(seed, len(prompts) * num_images_per_prompt)
        was_training = self.training
        self.eval()
        try:
            pipe = self.pipeline(scheduler)
            pipe.set_progress_bar_config(disable=not progress_bar)
            images = pipe(
                prompt=prompts,
                negative_prompt=None if negative_prompts is None else list(negative_prompts),
                guidance_scale=guidance_scale,
                num_inference_steps=num_inference_steps,
                height=height,
                width=width,
                generator=generator,
                num_images_per_prompt=num_images_per_prompt,
                output_type='pt',
                **extra,
            ).images
        finally:
            self.train(was_training)
        return images.float()
