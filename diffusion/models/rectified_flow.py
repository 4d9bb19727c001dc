"""Rectified flow: the training objective of Stable Diffusion 3 (Esser et al., 2024, "Scaling Rectified Flow
Transformers for High-Resolution Image Synthesis"), beside the DDPM family of :mod:`diffusion.models.objectives`.

The noisy input is a straight line between data and noise, ``x_t = (1 - t) x_0 + t * noise`` for ``t`` in [0, 1],
and the denoiser predicts the velocity along it, ``noise - x_0``. Training times are drawn from a logit-normal
density (SD3's default: ``sigmoid(N(mean, std))``), a uniform one or SD3's "mode" density, then moved toward the
noisy end by SD3's shift ``t' = shift * t / (1 + (shift - 1) * t)``; SD3 picks the shift per resolution (sec. 5.3.2:
``shift = sqrt(m / n)`` for ``m`` pixels against a reference of ``n``; 3.0 at 1024px), so the shift is a config value
set in the recipe of each resolution. Loss weights are SD3's optional ``sigma_sqrt`` and ``cosmap`` schemes. The
validation loss uses ``val_timesteps`` evenly spaced, unshifted times (the midpoints of as many equal bins of
[0, 1]) and the model's seeded validation noise, so it is the same number for the same weights, whatever the shift.

The denoiser sees ``t * num_train_timesteps`` as its timestep (what SD3's transformer was trained on, and what the
sampler below feeds it); the UNet takes the same float timesteps, so a yaml switches a UNet run to this objective
with ``model.objective: rectified_flow``.

Built on diffusers: ``training_utils.compute_density_for_timestep_sampling`` draws the training times,
``compute_loss_weighting_for_sd3`` gives the loss weights, and ``FlowMatchEulerDiscreteScheduler`` (or its Heun
twin), configured with the same shift, samples. Written here: the interpolation, the velocity target, the shift of
the training times and the fixed validation times.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from diffusion.models.noise import INFERENCE_SCHEDULERS
from diffusion.models.objectives import NoisedBatch, Objective, check_input_perturbation, perturbed
from diffusion.utils import ConfigError

__all__ = ['FLOW_SCHEDULERS', 'LOSS_WEIGHTINGS', 'TIMESTEP_SAMPLINGS', 'RectifiedFlowObjective', 'shift_sigmas']

#: Training-time densities of diffusers' ``compute_density_for_timestep_sampling``.
TIMESTEP_SAMPLINGS = ('logit_normal', 'uniform', 'mode')
#: Loss weightings of diffusers' ``compute_loss_weighting_for_sd3`` (``None``: uniform).
LOSS_WEIGHTINGS = ('sigma_sqrt', 'cosmap')
#: Samplers of a flow-matching model, by the name ``generate(scheduler=...)`` and the sampling CLI take.
FLOW_SCHEDULERS: dict[str, type] = {
    'flow_euler': FlowMatchEulerDiscreteScheduler,
    'flow_heun': FlowMatchHeunDiscreteScheduler,
}


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time shift ``shift * t / (1 + (shift - 1) * t)``: the identity at ``shift=1``; ``shift > 1`` spends more
    steps at high noise, which larger images need (their pixels are more redundant, so noise destroys less)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _check_choice(key: str, value: Optional[str], accepted: tuple[str, ...], allow_none: bool = False) -> None:
    if (value is None and allow_none) or value in accepted:
        return
    shown = ', '.join(accepted) + (' or null' if allow_none else '')
    raise ConfigError(f'Invalid model.objective.{key}={value!r}: expected one of {shown}.')


class RectifiedFlowObjective(Objective):
    """Rectified flow with a velocity target; see the module docstring.

    Args:
        timestep_sampling (str): Density of the training times: ``'logit_normal'``, ``'uniform'`` or ``'mode'``.
            Default: ``'logit_normal'``.
        logit_mean (float): Mean of the logit-normal density. Default: ``0.0`` (SD3).
        logit_std (float): Standard deviation of the logit-normal density. Default: ``1.0`` (SD3).
        mode_scale (float): Scale of the ``'mode'`` density. Default: ``1.29`` (SD3's).
        shift (float): SD3's time shift, for training and sampling; ``1.0`` leaves times unchanged. Default: ``1.0``.
        loss_weighting (str, optional): ``'sigma_sqrt'`` or ``'cosmap'``; ``None`` for uniform weights.
        num_train_timesteps (int): The denoiser's timestep is ``t * num_train_timesteps``. Default: ``1000``.
        val_timesteps (int): Number of fixed, evenly spaced times of the validation loss. Default: ``8``.
        input_perturbation (float): In training, ``x_t`` is built from ``noise + gamma * fresh_noise`` while the
            velocity target stays ``noise - x_0`` (see :class:`~diffusion.models.objectives.DDPMObjective`); ``0`` is
            off. Default: ``0.0``.
        inference_scheduler (str): Default sampler: ``'flow_euler'`` or ``'flow_heun'``. Default: ``'flow_euler'``.
    """

    scheduler_names = tuple(FLOW_SCHEDULERS)

    def __init__(
        self,
        *,
        timestep_sampling: str = 'logit_normal',
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        shift: float = 1.0,
        loss_weighting: Optional[str] = None,
        num_train_timesteps: int = 1000,
        val_timesteps: int = 8,
        input_perturbation: float = 0.0,
        inference_scheduler: str = 'flow_euler',
    ):
        check_input_perturbation(input_perturbation)
        _check_choice('timestep_sampling', timestep_sampling, TIMESTEP_SAMPLINGS)
        _check_choice('loss_weighting', loss_weighting, LOSS_WEIGHTINGS, allow_none=True)
        if inference_scheduler in INFERENCE_SCHEDULERS and inference_scheduler not in FLOW_SCHEDULERS:
            raise ConfigError(
                f'Invalid model.objective.inference_scheduler={inference_scheduler!r}: a DDPM-family sampler cannot '
                f'sample a rectified-flow model; expected one of {", ".join(FLOW_SCHEDULERS)}.'
            )
        _check_choice('inference_scheduler', inference_scheduler, self.scheduler_names)
        if shift <= 0:
            raise ConfigError(f'Invalid model.objective.shift={shift}: expected a positive number.')
        if logit_std <= 0:
            raise ConfigError(f'Invalid model.objective.logit_std={logit_std}: expected a positive number.')
        if val_timesteps < 1:
            raise ConfigError(f'Invalid model.objective.val_timesteps={val_timesteps}: expected at least 1.')
        self.timestep_sampling = timestep_sampling
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.mode_scale = mode_scale
        self.shift = float(shift)
        self.loss_weighting = loss_weighting
        self.num_train_timesteps = num_train_timesteps
        self.input_perturbation = float(input_perturbation)
        self.default_scheduler = inference_scheduler
        # Midpoints of val_timesteps equal bins of [0, 1], unshifted; kept as floats, on the CPU even while a model
        # is built on the meta device.
        self._val_sigmas = [(i + 0.5) / val_timesteps for i in range(val_timesteps)]

    def sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The times ``t`` in [0, 1] (B,) of the denoiser's timesteps, in float32."""
        return timesteps.float() / self.num_train_timesteps

    def sample_timesteps(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """Shifted training times from the configured density, as the denoiser's float timesteps (B,)."""
        sigmas = compute_density_for_timestep_sampling(
            self.timestep_sampling,
            batch_size,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            mode_scale=self.mode_scale,
            device=device,
        )
        return shift_sigmas(sigmas.float(), self.shift) * self.num_train_timesteps

    def noise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        noise: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> NoisedBatch:
        """``x_t = (1 - t) x_0 + t * noise`` and the velocity target ``noise - x_0``."""
        if noise is None:
            noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        sigmas = self.sigmas(timesteps).to(latents.device).view(-1, *([1] * (latents.ndim - 1)))
        # Training only (validation passes a generator): the input gets the perturbed noise, the target keeps noise.
        noisy_with = perturbed(noise, self.input_perturbation) if generator is None else noise
        noisy = (1.0 - sigmas) * latents + sigmas * noisy_with
        return NoisedBatch(noisy.to(latents.dtype), timesteps, (noise - latents).to(latents.dtype))

    def loss_weights(self, timesteps: torch.Tensor) -> Optional[torch.Tensor]:
        """SD3's ``sigma_sqrt`` or ``cosmap`` weights at the shifted times, or ``None``."""
        if self.loss_weighting is None:
            return None
        return compute_loss_weighting_for_sd3(self.loss_weighting, self.sigmas(timesteps)).float()

    def validation_timesteps(self, device: torch.device) -> list[torch.Tensor]:
        scale = self.num_train_timesteps
        return [torch.tensor(s * scale, device=device, dtype=torch.float32) for s in self._val_sigmas]

    def inference_scheduler(self, name: Optional[str] = None) -> SchedulerMixin:
        """The named flow-matching sampler (default: ``inference_scheduler``) with this objective's shift."""
        name = name or self.default_scheduler
        if name not in FLOW_SCHEDULERS:
            raise ConfigError(
                f'Unknown scheduler {name!r} for a rectified-flow model. Valid names: {", ".join(FLOW_SCHEDULERS)}.'
            )
        scheduler = FLOW_SCHEDULERS[name](num_train_timesteps=self.num_train_timesteps, shift=self.shift)
        # The SD and SDXL pipelines scale their first latents by this; flow sampling starts from unit noise.
        scheduler.init_noise_sigma = 1.0
        return scheduler

    def describe(self) -> dict[str, Any]:
        return {
            'objective': 'rectified flow',
            'prediction_type': 'flow (velocity: noise - x_0)',
            'timestep_sampling': self.timestep_sampling,
            'logit_mean': self.logit_mean,
            'logit_std': self.logit_std,
            'shift': self.shift,
            'loss_weighting': self.loss_weighting,
            'num_train_timesteps': self.num_train_timesteps,
            'input_perturbation': self.input_perturbation,
        }
