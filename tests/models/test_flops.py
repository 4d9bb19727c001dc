"""Denoiser FLOP counts: the SD2 UNet's published figures (181 GFLOP forward per image at 256 px, 804 at 512 px, by
torch's FlopCounterMode), and the model's flops_per_batch for SpeedMonitor."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from diffusion.models import UNetDenoiser
from diffusion.models.factories import SD2_UNET_CONFIG
from tests.conftest import build_tiny_sdxl


@pytest.mark.parametrize('latent_side, gflop', [(32, 181), (64, 804)])
def test_sd2_unet_forward_flops_match_the_reference(latent_side, gflop):
    with torch.device('meta'):
        denoiser = UNetDenoiser(UNet2DConditionModel(**SD2_UNET_CONFIG))
    flops = denoiser.forward_flops((4, latent_side, latent_side), {'text_embeds': (77, 1024)})
    assert flops / 1e9 == pytest.approx(gflop, rel=0.01)


def test_flops_per_batch_is_three_forwards_per_image_whatever_the_batch_holds(tiny_sd):
    forward = tiny_sd.denoiser.forward_flops((4, 8, 8), {'text_embeds': (77, 16)})
    images = {'image': torch.zeros(3, 3, 16, 16)}
    latents = {'image_latents_mean': torch.zeros(3, 4, 8, 8), 'image_latents_std': torch.ones(3, 4, 8, 8)}
    assert tiny_sd.flops_per_batch(images) == tiny_sd.flops_per_batch(latents) == 3 * 3 * forward > 0


def test_sdxl_flops_count_the_added_time_embedding():
    tiny_sdxl_model = build_tiny_sdxl()
    shapes = tiny_sdxl_model.conditioner.conditioning_shapes()
    assert set(shapes) == {'text_embeds', 'pooled_text_embeds', 'time_ids'}
    with_added = tiny_sdxl_model.denoiser.forward_flops((4, 8, 8), shapes)
    assert tiny_sdxl_model.flops_per_batch({'image': torch.zeros(2, 3, 16, 16)}) == 3 * 2 * with_added > 0
