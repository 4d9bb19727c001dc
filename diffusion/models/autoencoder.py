"""Training a KL autoencoder (diffusers ``AutoencoderKL``) as a Composer model.

Latent diffusion needs an image autoencoder. Production runs load the released SD VAE; the CPU demo and tests
train a tiny one on the same data first and hand it to the diffusion run through ``save_pretrained`` /
``from_pretrained``, the same path the real VAE takes. The loss is reconstruction (L1 or MSE) plus a small KL
term (Rombach et al., 2022, without the perceptual and adversarial terms, which a tiny demo does not need).

The model also keeps running estimates of the latent mean and standard deviation; :meth:`prepare_for_export` writes
``1 / std`` into the VAE config as its ``scaling_factor``, the way SD's 0.18215 was chosen, so that diffusion
latents have unit variance, and with ``shift_latents`` the mean as its ``shift_factor`` (as SD3's 16-channel VAE
has), so that they also have zero mean. ``vae_config: {latent_channels: 16}`` makes a 16-channel autoencoder.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from composer.models import ComposerModel
from diffusers import AutoencoderKL
from torchmetrics import MeanSquaredError, Metric

from diffusion.models.factories import SD_VAE_CONFIG, TINY_VAE_CONFIG, merge_config

__all__ = ['AutoencoderModel', 'autoencoder_kl', 'tiny_autoencoder']

RECONSTRUCTION_LOSSES = ('l1', 'mse')


class AutoencoderModel(ComposerModel):
    """Trains an ``AutoencoderKL`` on ``batch['image']`` (B, 3, H, W) in [-1, 1].

    Args:
        vae (AutoencoderKL): The autoencoder.
        kl_weight (float): Weight of the KL divergence to the unit Gaussian. Default: ``1e-6``.
        reconstruction_loss (str): ``'l1'`` or ``'mse'``. Default: ``'l1'``.
        std_momentum (float): Momentum of the running latent mean and standard deviation. Default: ``0.99``.
        shift_latents (bool): Export the running latent mean as the VAE's ``shift_factor``. Default: ``False``.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        kl_weight: float = 1e-6,
        reconstruction_loss: str = 'l1',
        std_momentum: float = 0.99,
        shift_latents: bool = False,
    ):
        super().__init__()
        if reconstruction_loss not in RECONSTRUCTION_LOSSES:
            valid = ', '.join(RECONSTRUCTION_LOSSES)
            raise ValueError(f'Unknown reconstruction_loss {reconstruction_loss!r}. Valid values: {valid}.')
        self.vae = vae
        self.kl_weight = kl_weight
        self.reconstruction_loss = reconstruction_loss
        self.std_momentum = std_momentum
        self.shift_latents = shift_latents
        self.register_buffer('latent_var', torch.ones(()))
        if shift_latents:  # only then, so that checkpoints of unshifted autoencoders keep their keys
            self.register_buffer('latent_mean', torch.zeros(()))

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (reconstruction (B, 3, H, W), posterior mean, posterior log-variance)."""
        posterior = self.vae.encode(batch['image']).latent_dist
        latents = posterior.sample()
        if self.training:
            with torch.no_grad():
                var = latents.float().var()
                self.latent_var.mul_(self.std_momentum).add_((1 - self.std_momentum) * var)
                if self.shift_latents:
                    self.latent_mean.mul_(self.std_momentum).add_((1 - self.std_momentum) * latents.float().mean())
        return self.vae.decode(latents).sample, posterior.mean, posterior.logvar

    def loss(self, outputs: tuple[torch.Tensor, ...], batch: dict[str, Any]) -> torch.Tensor:
        reconstruction, mean, logvar = outputs
        target = batch['image']
        if self.reconstruction_loss == 'l1':
            rec = F.l1_loss(reconstruction.float(), target.float())
        else:
            rec = F.mse_loss(reconstruction.float(), target.float())
        kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float()).mean()
        return rec + self.kl_weight * kl

    def eval_forward(self, batch: dict[str, Any], outputs: Optional[Any] = None) -> torch.Tensor:
        if outputs is not None:
            return outputs[0]
        posterior = self.vae.encode(batch['image']).latent_dist
        return self.vae.decode(posterior.mode()).sample

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return {} if is_train else {'MeanSquaredError': MeanSquaredError()}

    def update_metric(self, batch: Any, outputs: Any, metric: Metric) -> None:
        metric.update(outputs.float().clamp(-1, 1), batch['image'].float())

    def prepare_for_export(self) -> None:
        """Set the VAE's ``scaling_factor`` to 1 / (running latent std) so that scaled latents have unit variance, and
        with ``shift_latents`` its ``shift_factor`` to the running mean."""
        self.vae.register_to_config(scaling_factor=float(self.latent_var.clamp(min=1e-8).rsqrt()))
        if self.shift_latents:
            self.vae.register_to_config(shift_factor=float(self.latent_mean))


def autoencoder_kl(
    vae_config: Optional[dict] = None, pretrained: Optional[str] = None, **kwargs: Any
) -> AutoencoderModel:
    """The SD VAE architecture (random weights, fields overridable) or one loaded from ``pretrained``."""
    vae = (
        AutoencoderKL.from_pretrained(pretrained, use_safetensors=True)  # never a pickled .bin
        if pretrained
        else AutoencoderKL(**merge_config(SD_VAE_CONFIG, vae_config))
    )
    return AutoencoderModel(vae, **kwargs)


def tiny_autoencoder(vae_config: Optional[dict] = None, **kwargs: Any) -> AutoencoderModel:
    """The tiny VAE of :func:`diffusion.models.tiny_stable_diffusion`, for CPU demos and tests."""
    return AutoencoderModel(AutoencoderKL(**merge_config(TINY_VAE_CONFIG, vae_config)), **kwargs)
