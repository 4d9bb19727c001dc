"""The SDXL model: architecture sizes, conditioning identical to diffusers' SDXL pipeline, dropout, precomputed
embeddings, micro-conditioning, sampling and loading components with from_pretrained."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from diffusion.models import SDXLTextConditioner, StableDiffusion, stable_diffusion_xl, tiny_stable_diffusion_xl
from diffusion.models.factories import TINY_SDXL_UNET_CONFIG, XL_COMPONENTS
from tests.conftest import TEST_XL, build_tiny_sdxl


@pytest.fixture
def sdxl() -> StableDiffusion:
    torch.manual_seed(0)
    return build_tiny_sdxl()


def batch_of(model: StableDiffusion, size: int = 2, **extra) -> dict:
    captions = ['a red circle', 'a blue square', 'a green star', 'a photo'][:size]
    return {'image': torch.rand(size, 3, 16, 16) * 2 - 1, 'captions': captions, **extra}


def test_sdxl_base_architecture_sizes_on_meta_device():
    with torch.device('meta'):
        model = stable_diffusion_xl()
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(model.unet) == 2_567_463_684
    assert count(model.text_encoder) == 123_060_480
    assert count(model.text_encoder_2) == 694_659_840
    assert model.unet.config.addition_embed_type == 'text_time'
    assert model.unet.config.cross_attention_dim == 768 + 1280
    assert model.latent_scaling_factor == pytest.approx(0.13025)
    assert model.tokenizer.pad_token == '<|endoftext|>' and model.tokenizer_2.pad_token == '!'
    assert isinstance(model.conditioner, SDXLTextConditioner)
    # Only the UNet trains; both text encoders are frozen.
    assert not any(p.requires_grad for p in model.text_encoder_2.parameters())


def test_conditioning_equals_the_diffusers_sdxl_pipeline(sdxl):
    """Training must feed the UNet exactly what StableDiffusionXLPipeline feeds it when sampling."""
    prompts = ['a red circle', 'a blue square']
    pipe = sdxl.pipeline()
    text = sdxl.conditioner.text_embeddings(prompts)
    context, pooled = text['text_embeds'], text['pooled_text_embeds']
    with torch.no_grad():
        pipe_context, _, pipe_pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    torch.testing.assert_close(context, pipe_context)
    torch.testing.assert_close(pooled, pipe_pooled)

    batch = {
        'captions': prompts,
        'cond_original_size': torch.tensor([[300, 200], [16, 16]]),
        'cond_crops_coords_top_left': torch.tensor([[5, 0], [0, 0]]),
        'cond_target_size': torch.tensor([[16, 16], [16, 16]]),
    }
    latents = torch.zeros(2, 4, 8, 8)
    conditioning = sdxl.conditioning(batch, drop_captions=False, latents=latents)
    expected = pipe._get_add_time_ids((300, 200), (5, 0), (16, 16), dtype=torch.float32, text_encoder_projection_dim=16)
    torch.testing.assert_close(conditioning['time_ids'][:1], expected)
    # The UNet receives them as its added conditioning, as the pipeline passes them.
    kwargs = sdxl.denoiser.network_kwargs(conditioning)
    assert kwargs['added_cond_kwargs']['time_ids'] is conditioning['time_ids']
    assert kwargs['added_cond_kwargs']['text_embeds'] is conditioning['pooled_text_embeds']
    # Without the keys, an uncropped image of the latents' size: what sampling uses by default.
    default = sdxl.conditioning({'captions': prompts}, drop_captions=False, latents=latents)['time_ids']
    torch.testing.assert_close(default, torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 2))


def test_loss_trains_the_unet_with_micro_conditioning(sdxl):
    batch = batch_of(sdxl, cond_original_size=torch.tensor([[32, 24], [16, 16]]))
    loss = sdxl.loss(sdxl(batch), batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert sdxl.unet.add_embedding.linear_1.weight.grad.abs().sum() > 0  # the pooled/time embedding trains
    assert all(p.grad is None for p in sdxl.text_encoder_2.parameters())
    # The size conditioning reaches the prediction.
    sdxl.eval()
    with torch.no_grad():
        a = sdxl.eval_forward(batch)[0]
        b = sdxl.eval_forward({**batch, 'cond_original_size': torch.tensor([[64, 64], [64, 64]])})[0]
    assert (a - b).abs().max() > 1e-6


def test_caption_dropout_zeroes_context_and_pooled(sdxl):
    model = build_tiny_sdxl(caption_drop_prob=1.0)
    kwargs = model.conditioning(batch_of(model), drop_captions=True, latents=torch.zeros(2, 4, 8, 8))
    assert kwargs['text_embeds'].abs().max() == 0
    assert kwargs['pooled_text_embeds'].abs().max() == 0
    model = build_tiny_sdxl(caption_drop_prob=0.3)
    torch.manual_seed(1)
    batch = {'captions': ['a red circle'] * 2000}
    with torch.no_grad():
        context = model.conditioning(batch, drop_captions=True, latents=torch.zeros(2000, 4, 8, 8))
    dropped = (context['text_embeds'].abs().amax(dim=(1, 2)) == 0).float().mean().item()
    assert abs(dropped - 0.3) < 0.04


def test_precomputed_embeddings_give_the_same_loss(sdxl):
    batch = batch_of(sdxl)
    with torch.no_grad():
        mean, std = sdxl.vae_moments(batch['image'])
        text = sdxl.conditioner.text_embeddings(batch['captions'])
    assert text['text_embeds'].shape == (2, 77, 32) and text['pooled_text_embeds'].shape == (2, 16)
    latent_batch = {'image_latents_mean': mean, 'image_latents_std': std, **text}
    sdxl.eval()
    with torch.no_grad():
        from_images = sdxl.eval_forward(batch)
        from_latents = sdxl.eval_forward(latent_batch)
    torch.testing.assert_close(from_images[0], from_latents[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(KeyError, match='pooled_text_embeds'):
        sdxl.eval_forward({'image_latents_mean': mean, 'image_latents_std': std, 'text_embeds': text['text_embeds']})


def test_generate_cfg_negatives_schedulers_and_micro_conditioning(sdxl):
    kwargs = dict(num_inference_steps=3, guidance_scale=4.0)
    for scheduler in ('ddim', 'euler', 'dpm++'):
        a = sdxl.generate(['a red circle'], seed=[1], scheduler=scheduler, **kwargs)
        b = sdxl.generate(['a red circle'], seed=[1], scheduler=scheduler, **kwargs)
        torch.testing.assert_close(a, b)
        assert a.shape == (1, 3, 16, 16)
    base = sdxl.generate('a red circle', seed=1, **kwargs)
    negative = sdxl.generate('a red circle', negative_prompts='blue', seed=1, **kwargs)
    assert (base - negative).abs().mean() > 1e-4
    # Sizes default to the output resolution, and can be set.
    explicit = sdxl.generate('a red circle', seed=1, original_size=(16, 16), target_size=(16, 16), **kwargs)
    torch.testing.assert_close(base, explicit)
    other = sdxl.generate('a red circle', seed=1, original_size=(64, 32), crops_coords_top_left=(4, 0), **kwargs)
    assert (base - other).abs().max() > 1e-6
    wide = sdxl.generate('a red circle', seed=1, height=16, width=32, num_inference_steps=2)
    assert wide.shape == (1, 3, 16, 32)
    with pytest.raises(TypeError, match='unexpected arguments'):
        sdxl.generate('a', seed=1, target_sizes=(16, 16), **kwargs)


def test_components_load_with_from_pretrained(sdxl, tmp_path):
    sdxl.pipeline().save_pretrained(tmp_path, safe_serialization=True)
    loaded = tiny_stable_diffusion_xl(
        **TEST_XL, pretrained_model_name_or_path=str(tmp_path), pretrained_components=XL_COMPONENTS
    )
    for name in ('unet', 'vae', 'text_encoder', 'text_encoder_2'):
        original, reloaded = getattr(sdxl, name).state_dict(), getattr(loaded, name).state_dict()
        assert original.keys() == reloaded.keys()
        assert all(torch.equal(original[k], reloaded[k]) for k in original), name
    assert loaded.tokenizer_2('a cat').input_ids == sdxl.tokenizer_2('a cat').input_ids
    torch.testing.assert_close(
        loaded.generate('a cat', seed=3, num_inference_steps=2), sdxl.generate('a cat', seed=3, num_inference_steps=2)
    )


def test_invalid_sdxl_configurations_are_named():
    with pytest.raises(ValueError, match="addition_embed_type='text_time'"):
        tiny_stable_diffusion_xl(**{**TEST_XL, 'unet_config': {**TEST_XL['unet_config'], 'addition_embed_type': None}})
    with pytest.raises(ValueError, match='cross_attention_dim'):
        tiny_stable_diffusion_xl(**{**TEST_XL, 'unet_config': {**TEST_XL['unet_config'], 'cross_attention_dim': 48}})
    with pytest.raises(ValueError, match='Unknown pretrained_components'):
        tiny_stable_diffusion_xl(pretrained_model_name_or_path='x', pretrained_components=['unet_2'])
    with pytest.raises(ValueError, match='Unknown key model.caption_drop'):
        from diffusion import registry

        registry.models.build('tiny_stable_diffusion_xl', {'caption_drop': 0.1}, where='model')
    assert UNet2DConditionModel(**TINY_SDXL_UNET_CONFIG).config.addition_embed_type == 'text_time'
