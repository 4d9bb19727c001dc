"""Training objectives: what the denoiser learns to predict, at which timesteps, with which weights.

An :class:`Objective` owns everything about the forward (noising) process that the model must not hard-code: the
noisy input and the regression target for clean latents, noise and timesteps; how timesteps and noise are drawn in
training; the per-sample loss weights; the fixed timesteps and seeded noise of the validation loss; and the
diffusers inference scheduler that undoes the same process at sampling time. The model composes one, so a second
objective (rectified flow) is a class here and a line in :data:`diffusion.models.registries.objectives`.

:class:`DDPMObjective` is the DDPM family of Stable Diffusion 1/2 and SDXL, built on diffusers' ``DDPMScheduler``
(``add_noise``, ``get_velocity``, zero-terminal-SNR rescaling) and the helpers of :mod:`diffusion.models.noise`
(signal-to-noise ratio, min-SNR-gamma weights, targets for epsilon / v / sample prediction).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from diffusion.models.noise import (
    INFERENCE_SCHEDULERS,
    build_inference_scheduler,
    build_noise_scheduler,
    min_snr_weights,
    signal_to_noise_ratio,
    training_target,
)

__all__ = ['DDPMObjective', 'NoisedBatch', 'Objective', 'check_input_perturbation', 'perturbed']


def check_input_perturbation(gamma: float) -> None:
    """Refuse a negative or non-numeric ``model.objective.input_perturbation``, naming the key."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or gamma < 0:
        raise ValueError(f'Invalid model.objective.input_perturbation={gamma!r}: expected a number >= 0 (0 is off).')


def perturbed(noise: torch.Tensor, gamma: float) -> torch.Tensor:
    """``noise + gamma * fresh`` with ``fresh`` drawn from the global RNG (input perturbation); ``noise`` itself
    when ``gamma`` is 0, with nothing drawn, so that runs without it keep their random stream."""
    if not gamma:
        return noise
    return noise + gamma * torch.randn_like(noise)


class NoisedBatch:
    """The denoiser's input and the regression target for one batch.

    Attributes:
        noisy_latents (torch.Tensor): (B, C, h, w) latents with noise at ``timesteps``.
        timesteps (torch.Tensor): (B,) the timesteps as the denoiser takes them (DDPM: integer steps).
        target (torch.Tensor): (B, C, h, w) what the denoiser should predict.
    """

    __slots__ = ('noisy_latents', 'timesteps', 'target')

    def __init__(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, target: torch.Tensor):
        self.noisy_latents = noisy_latents
        self.timesteps = timesteps
        self.target = target


class Objective:
    """Interface of a training objective; see the module docstring.

    Subclasses implement :meth:`sample_timesteps`, :meth:`noise`, :meth:`loss_weights`,
    :meth:`validation_timesteps`, :meth:`inference_scheduler` and :meth:`describe`.
    """

    #: Names that :meth:`inference_scheduler` accepts, for argument checks in the sampling CLI.
    scheduler_names: tuple[str, ...] = ()
    #: Default inference scheduler name.
    default_scheduler: str = ''

    def sample_timesteps(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """Training timesteps (B,), drawn from the global RNG."""
        raise NotImplementedError

    def noise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        noise: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> NoisedBatch:
        """Noise ``latents`` at ``timesteps`` (with ``noise``, or noise drawn from ``generator``)."""
        raise NotImplementedError

    def loss_weights(self, timesteps: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-sample loss weights (B,) for the timesteps :meth:`noise` returned; ``None`` for uniform."""
        raise NotImplementedError

    def validation_timesteps(self, device: torch.device) -> list[torch.Tensor]:
        """The fixed timesteps of the validation loss, one scalar tensor each."""
        raise NotImplementedError

    def inference_scheduler(self, name: Optional[str] = None) -> SchedulerMixin:
        """A diffusers scheduler that samples from a model trained with this objective."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The facts a model card states about the objective (``prediction_type``, ...)."""
        raise NotImplementedError


class DDPMObjective(Objective):
    """The DDPM family: epsilon / v / sample prediction, zero-terminal SNR, offset noise and min-SNR weighting.

    Args:
        noise_scheduler (DDPMScheduler, optional): The training noise schedule; its ``prediction_type`` sets the
            target. Default: built from the keyword arguments below with
            :func:`~diffusion.models.noise.build_noise_scheduler`.
        prediction_type (str): ``'epsilon'``, ``'v_prediction'`` or ``'sample'`` (when no scheduler is given).
            Default: ``'epsilon'``.
        zero_terminal_snr (bool): Rescale the betas so that the last step is pure noise. Default: ``False``.
        num_train_timesteps (int): Number of diffusion steps. Default: ``1000``.
        beta_schedule (str): A diffusers beta schedule name. Default: ``'scaled_linear'``.
        beta_start (float): First beta. Default: ``0.00085``.
        beta_end (float): Last beta. Default: ``0.012``.
        offset_noise (float): Scale of per-channel constant noise added to the training noise, which lets the model
            change an image's mean brightness. Default: ``0.0``.
        min_snr_gamma (float, optional): Gamma of min-SNR loss weighting; ``None`` for uniform weights.
        input_perturbation (float): Input perturbation ``gamma`` (Ning et al., 2023, "Input Perturbation Reduces
            Exposure Bias in Diffusion Models"; diffusers' ``--input_perturbation``): in training the noisy input is
            built from ``noise + gamma * fresh_noise`` while the target stays that of ``noise``, which mimics the
            error of the model's own predictions at sampling time. ``0`` is off; 0.1 is the paper's value. The
            validation loss is never perturbed. Default: ``0.0``.
        val_timesteps (int): Number of evenly spaced timesteps of the validation loss. Default: ``10``.
        inference_scheduler (str): Default sampler: ``'ddim'``, ``'euler'``, ``'dpm++'``, ... Default: ``'ddim'``.
    """

    scheduler_names = tuple(INFERENCE_SCHEDULERS)

    def __init__(
        self,
        noise_scheduler: Optional[DDPMScheduler] = None,
        *,
        prediction_type: str = 'epsilon',
        zero_terminal_snr: bool = False,
        num_train_timesteps: int = 1000,
        beta_schedule: str = 'scaled_linear',
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        offset_noise: float = 0.0,
        min_snr_gamma: Optional[float] = None,
        input_perturbation: float = 0.0,
        val_timesteps: int = 10,
        inference_scheduler: str = 'ddim',
    ):
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ValueError(f'min_snr_gamma must be positive or None, got {min_snr_gamma}.')
        check_input_perturbation(input_perturbation)
        if noise_scheduler is None:
            noise_scheduler = build_noise_scheduler(
                prediction_type=prediction_type,
                num_train_timesteps=num_train_timesteps,
                beta_schedule=beta_schedule,
                beta_start=beta_start,
                beta_end=beta_end,
                zero_terminal_snr=zero_terminal_snr,
            )
        build_inference_scheduler(inference_scheduler, noise_scheduler)  # validates the name early
        self.noise_scheduler = noise_scheduler
        self.offset_noise = offset_noise
        self.min_snr_gamma = min_snr_gamma
        self.input_perturbation = float(input_perturbation)
        self.default_scheduler = inference_scheduler
        num_steps = noise_scheduler.config.num_train_timesteps
        # On the CPU even while a model is built on the meta device (to count parameters or FLOPs).
        self._val_timesteps = torch.linspace(0, num_steps - 1, val_timesteps, device='cpu').round().long().tolist()

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    def sample_timesteps(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """Integer timesteps uniform in [0, num_train_timesteps)."""
        return torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (batch_size,), device=device)

    def noise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        noise: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> NoisedBatch:
        """``add_noise`` and the target of the prediction type; offset noise is drawn after the noise itself."""
        if noise is None:
            noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        if generator is not None:
            # Validation draws the offset whether or not it is used, so that each timestep's noise stays the same
            # when offset_noise changes.
            offset = torch.randn(latents.shape[:2] + (1, 1), generator=generator, device=latents.device)
        else:
            offset = None
        if self.offset_noise > 0:
            if offset is None:
                offset = torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device)
            noise = noise + self.offset_noise * offset.to(noise.dtype)
        # Training only (validation passes a generator): the input gets the perturbed noise, the target keeps noise.
        noisy_with = perturbed(noise, self.input_perturbation) if generator is None else noise
        noisy = self.noise_scheduler.add_noise(latents, noisy_with, timesteps)
        target = training_target(self.noise_scheduler, latents, noise, timesteps)
        return NoisedBatch(noisy, timesteps, target)

    def loss_weights(self, timesteps: torch.Tensor) -> Optional[torch.Tensor]:
        """Min-SNR-gamma weights expressed for the prediction type, or ``None``."""
        if self.min_snr_gamma is None:
            return None
        snr = signal_to_noise_ratio(self.noise_scheduler, timesteps)
        return min_snr_weights(snr, self.min_snr_gamma, self.prediction_type)

    def validation_timesteps(self, device: torch.device) -> list[torch.Tensor]:
        return [torch.tensor(t, device=device, dtype=torch.long) for t in self._val_timesteps]

    def inference_scheduler(self, name: Optional[str] = None) -> SchedulerMixin:
        """The named sampler (default: ``inference_scheduler``) with this schedule's betas and target."""
        return build_inference_scheduler(name or self.default_scheduler, self.noise_scheduler)

    def describe(self) -> dict[str, Any]:
        config = self.noise_scheduler.config
        return {
            'objective': 'DDPM',
            'prediction_type': config.prediction_type,
            'zero_terminal_snr': bool(config.get('rescale_betas_zero_snr', False)),
            'num_train_timesteps': int(config.num_train_timesteps),
            'min_snr_gamma': self.min_snr_gamma,
            'offset_noise': self.offset_noise,
            'input_perturbation': self.input_perturbation,
        }
