"""Noise schedules, prediction targets and loss weighting for latent diffusion training.

Built on diffusers' schedulers: ``DDPMScheduler`` owns the training forward process (``add_noise``,
``get_velocity``) and the zero-terminal-SNR rescaling of the betas (Lin et al., 2023, "Common Diffusion Noise
Schedules and Sample Steps are Flawed"); the inference schedulers (DDIM, Euler, DPM-Solver++) are created from the
training scheduler's config so that betas, prediction type and rescaling always agree. What diffusers lacks is
written here: the per-timestep signal-to-noise ratio and min-SNR-gamma loss weights (Hang et al., 2023).
"""

from __future__ import annotations

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

__all__ = [
    'INFERENCE_SCHEDULERS',
    'PREDICTION_TYPES',
    'build_inference_scheduler',
    'build_noise_scheduler',
    'min_snr_weights',
    'signal_to_noise_ratio',
    'training_target',
]

PREDICTION_TYPES = ('epsilon', 'v_prediction', 'sample')

# name -> (scheduler class, extra config)
INFERENCE_SCHEDULERS: dict[str, tuple[type, dict]] = {
    'ddim': (DDIMScheduler, {}),
    'ddpm': (DDPMScheduler, {}),
    'euler': (EulerDiscreteScheduler, {}),
    'euler_ancestral': (EulerAncestralDiscreteScheduler, {}),
    'dpm++': (DPMSolverMultistepScheduler, {'algorithm_type': 'dpmsolver++', 'solver_order': 2}),
}


def build_noise_scheduler(
    prediction_type: str = 'epsilon',
    num_train_timesteps: int = 1000,
    beta_schedule: str = 'scaled_linear',
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    zero_terminal_snr: bool = False,
) -> DDPMScheduler:
    """The training noise scheduler. Defaults are Stable Diffusion 2's (scaled-linear betas, 1000 steps).

    Args:
        prediction_type (str): What the UNet predicts: ``'epsilon'``, ``'v_prediction'`` or ``'sample'``.
        num_train_timesteps (int): Number of diffusion steps. Default: ``1000``.
        beta_schedule (str): A diffusers beta schedule name. Default: ``'scaled_linear'``.
        beta_start (float): First beta. Default: ``0.00085``.
        beta_end (float): Last beta. Default: ``0.012``.
        zero_terminal_snr (bool): Rescale the betas so that the last step is pure noise (alpha-bar = 0).
            Use with ``v_prediction``: at zero SNR an epsilon target carries no information about the image.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f'Unknown prediction_type {prediction_type!r}. Valid values: {", ".join(PREDICTION_TYPES)}.')
    if zero_terminal_snr and prediction_type == 'epsilon':
        raise ValueError(
            'zero_terminal_snr=True needs prediction_type="v_prediction" or "sample": with epsilon prediction the '
            'last timestep (pure noise) has an unlearnable target.'
        )
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        beta_start=beta_start,
        beta_end=beta_end,
        prediction_type=prediction_type,
        rescale_betas_zero_snr=zero_terminal_snr,
        # Sampling with "trailing" spacing starts at the last timestep, which zero-terminal-SNR needs.
        timestep_spacing='trailing' if zero_terminal_snr else 'leading',
        steps_offset=1,
        clip_sample=False,
    )


def build_inference_scheduler(name: str, noise_scheduler: SchedulerMixin) -> SchedulerMixin:
    """An inference scheduler chosen by ``name`` that shares the training scheduler's betas and target."""
    if name not in INFERENCE_SCHEDULERS:
        raise ValueError(f'Unknown scheduler {name!r}. Valid names: {", ".join(INFERENCE_SCHEDULERS)}.')
    cls, extra = INFERENCE_SCHEDULERS[name]
    return cls.from_config(noise_scheduler.config, **extra)


def signal_to_noise_ratio(noise_scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = alpha_bar_t / (1 - alpha_bar_t) for each timestep, shape (B,), float32."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)
    alpha_bar = alphas_cumprod[timesteps]
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al., 2023), expressed for the given prediction target.

    The paper weights the x0-space loss by ``min(SNR, gamma)``. An epsilon loss equals the x0 loss times SNR
    and a v loss equals it times (SNR + 1), so the weights become ``min(SNR, gamma) / SNR`` and
    ``min(SNR, gamma) / (SNR + 1)``. At SNR = 0 (zero terminal SNR) the epsilon weight is taken as 1.
    """
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == 'epsilon':
        return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))
    if prediction_type == 'v_prediction':
        return clipped / (snr + 1.0)
    if prediction_type == 'sample':
        return clipped
    raise ValueError(f'Unknown prediction_type {prediction_type!r}. Valid values: {", ".join(PREDICTION_TYPES)}.')


def training_target(
    noise_scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The regression target for the scheduler's prediction type: the noise, the velocity or the clean latents."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == 'epsilon':
        return noise
    if prediction_type == 'v_prediction':
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == 'sample':
        return latents
    raise ValueError(f'Unknown prediction_type {prediction_type!r}. Valid values: {", ".join(PREDICTION_TYPES)}.')
