"""UNet FLOP counts: the SD2 figures of shared/REFERENCE.md, and the model's flops_per_batch for SpeedMonitor."""

import pytest
import torch

from diffusion.models.factories import SD2_UNET_CONFIG
from diffusion.models.flops import unet_forward_flops


@pytest.mark.parametrize('latent_side, gflop', [(32, 181), (64, 804)])
def test_sd2_unet_forward_flops_match_the_reference(latent_side, gflop):
    flops = unet_forward_flops(SD2_UNET_CONFIG, (4, latent_side, latent_side), (77, 1024))
    assert flops / 1e9 == pytest.approx(gflop, rel=0.01)


def test_flops_per_batch_is_three_forwards_per_image_whatever_the_batch_holds(tiny_sd):
    forward = unet_forward_flops(tiny_sd.unet.config, (4, 8, 8), (77, 16))
    images = {'image': torch.zeros(3, 3, 16, 16)}
    latents = {'image_latents_mean': torch.zeros(3, 4, 8, 8), 'image_latents_std': torch.ones(3, 4, 8, 8)}
    assert tiny_sd.flops_per_batch(images) == tiny_sd.flops_per_batch(latents) == 3 * 3 * forward > 0
