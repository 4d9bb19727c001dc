import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from diffusion.models.factories import SD2_UNET_CONFIG, SD_VAE_CONFIG
from diffusion.models.noise import min_snr_weights, signal_to_noise_ratio
from tests.conftest import build_tiny_sd


def batch_of(model, n=4, size=16):
    return {'image': torch.rand(n, 3, size, size) * 2 - 1, 'captions': ['a red circle on a gray background'] * n}


def test_sd2_unet_parameter_count_on_meta_device():
    with torch.device('meta'):
        unet = UNet2DConditionModel(**SD2_UNET_CONFIG)
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724


def test_sd_vae_parameter_count_on_meta_device():
    from diffusers import AutoencoderKL

    with torch.device('meta'):
        vae = AutoencoderKL(**SD_VAE_CONFIG)
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863


def test_forward_shapes_and_frozen_encoders(tiny_sd):
    outputs = tiny_sd(batch_of(tiny_sd))
    prediction, target, timesteps = outputs
    assert prediction.shape == target.shape == (4, 4, 8, 8)
    assert timesteps.shape == (4,)
    loss = tiny_sd.loss(outputs, batch_of(tiny_sd))
    loss.backward()
    assert all(p.grad is None for p in tiny_sd.vae.parameters())
    assert all(p.grad is None for p in tiny_sd.text_encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_sd.unet.parameters())
    tiny_sd.train()
    assert tiny_sd.unet.training and not tiny_sd.vae.training and not tiny_sd.text_encoder.training


def test_train_text_encoder_option_unfreezes_it():
    model = build_tiny_sd(train_text_encoder=True)
    model.loss(model(batch_of(model)), None).backward()
    assert any(p.grad is not None for p in model.text_encoder.parameters())
    assert model.text_encoder.training


@pytest.mark.parametrize('prediction_type', ['epsilon', 'v_prediction', 'sample'])
def test_model_target_per_prediction_type(prediction_type):
    model = build_tiny_sd(prediction_type=prediction_type)
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([5, 400, 990])
    target = model.objective.noise(latents, timesteps, noise=noise).target
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    ab = torch.tensor(np.cumprod(1 - betas)[timesteps.numpy()], dtype=torch.float32)[:, None, None, None]
    expected = {'epsilon': noise, 'v_prediction': ab.sqrt() * noise - (1 - ab).sqrt() * latents, 'sample': latents}
    torch.testing.assert_close(target, expected[prediction_type], atol=1e-5, rtol=1e-4)


def test_offset_noise_adds_per_channel_constant():
    model = build_tiny_sd(offset_noise=0.5, prediction_type='epsilon')
    latents, noise = torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)
    offset = torch.randn(2, 4, 1, 1, generator=torch.Generator().manual_seed(7))
    # With a generator (validation), the offset is drawn from it after the noise, which is given here.
    target = model.objective.noise(latents, torch.tensor([1, 2]), noise, torch.Generator().manual_seed(7)).target
    torch.testing.assert_close(target, (0.5 * offset).expand(2, 4, 8, 8))


def test_min_snr_loss_is_weighted_mean():
    model = build_tiny_sd(min_snr_gamma=5.0, prediction_type='v_prediction')
    prediction, target = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    timesteps = torch.tensor([1, 100, 500, 999])
    loss = model.loss((prediction, target, timesteps), None)
    per_sample = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    snr = signal_to_noise_ratio(model.objective.noise_scheduler, timesteps)
    expected = (per_sample * torch.minimum(snr, torch.tensor(5.0)) / (snr + 1)).mean()
    torch.testing.assert_close(loss, expected)
    assert not torch.allclose(loss, per_sample.mean())
    torch.testing.assert_close(
        min_snr_weights(snr, 5.0, 'v_prediction'), torch.minimum(snr, torch.tensor(5.0)) / (snr + 1)
    )


@pytest.mark.parametrize('prob', [0.0, 0.3, 1.0])
def test_caption_dropout_rate(prob):
    model = build_tiny_sd(caption_drop_prob=prob)
    ids = model.conditioner.tokenize(['a red circle'] * 4000)['input_ids']
    dropped = model.conditioner.drop_input_ids(ids)
    empty = model.conditioner.tokenize([''])['input_ids'][0]
    is_empty = (dropped == empty).all(dim=1).float().mean().item()
    assert abs(is_empty - prob) < 0.03
    kept = ~(dropped == empty).all(dim=1)
    assert torch.equal(dropped[kept], ids[kept])


def test_caption_dropout_is_training_only():
    model = build_tiny_sd(caption_drop_prob=1.0)
    batch = {'input_ids': model.conditioner.tokenize(['a blue square'] * 2)['input_ids']}
    model.eval()
    with torch.no_grad():
        eval_cond = model.conditioning(batch, drop_captions=model.training, latents=torch.zeros(2, 4, 8, 8))
        expected = model.conditioner.encode(batch)
    torch.testing.assert_close(eval_cond['text_embeds'], expected['text_embeds'])


def test_invalid_options_raise():
    with pytest.raises(ValueError, match='caption_drop_prob'):
        build_tiny_sd(caption_drop_prob=1.5)
    with pytest.raises(ValueError, match='Unknown key model.caption_drop_prb'):
        build_tiny_sd(caption_drop_prb=0.1)
    with pytest.raises(ValueError, match="'heun'"):
        build_tiny_sd(inference_scheduler='heun')


def test_eval_forward_is_reproducible_at_fixed_timesteps(tiny_sd):
    batch = batch_of(tiny_sd, n=2)
    tiny_sd.eval()
    with torch.no_grad():
        pred1, target1 = tiny_sd.eval_forward(batch)
        torch.manual_seed(123)  # the global RNG must not matter
        pred2, target2 = tiny_sd.eval_forward(batch)
    assert pred1.shape == (2 * 10, 4, 8, 8)
    torch.testing.assert_close(pred1, pred2)
    torch.testing.assert_close(target1, target2)
    metric = tiny_sd.get_metrics(is_train=False)['MeanSquaredError']
    tiny_sd.update_metric(batch, (pred1, target1), metric)
    torch.testing.assert_close(metric.compute(), ((pred1 - target1) ** 2).mean())


@pytest.mark.parametrize('scheduler', ['ddim', 'euler', 'dpm++'])
def test_generate_is_deterministic_per_seed(tiny_sd, scheduler):
    kwargs = dict(num_inference_steps=4, guidance_scale=3.0, scheduler=scheduler)
    a = tiny_sd.generate(['a red circle', 'a blue square'], seed=7, **kwargs)
    b = tiny_sd.generate(['a red circle', 'a blue square'], seed=7, **kwargs)
    c = tiny_sd.generate(['a red circle', 'a blue square'], seed=8, **kwargs)
    assert a.shape == (2, 3, 16, 16)
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    torch.testing.assert_close(a, b)
    assert (a - c).abs().mean() > 1e-3
    assert tiny_sd.training  # generate restores the training mode


def test_generate_negative_prompt_and_size(tiny_sd):
    base = tiny_sd.generate('a red circle', num_inference_steps=3, seed=1, guidance_scale=4.0)
    negative = tiny_sd.generate(
        'a red circle', negative_prompts='blue', num_inference_steps=3, seed=1, guidance_scale=4.0
    )
    assert (base - negative).abs().mean() > 1e-4
    wide = tiny_sd.generate('a red circle', num_inference_steps=2, seed=1, height=16, width=32)
    assert wide.shape == (1, 3, 16, 32)


def test_generate_per_image_seeds_do_not_depend_on_the_batch(tiny_sd):
    kwargs = dict(num_inference_steps=3, guidance_scale=3.0)
    batch = tiny_sd.generate(['a red circle', 'a blue square', 'a green star'], seed=[5, 6, 7], **kwargs)
    alone = tiny_sd.generate(['a blue square'], seed=[6], **kwargs)
    torch.testing.assert_close(batch[1:2], alone)
    swapped = tiny_sd.generate(['a green star', 'a red circle'], seed=[7, 5], **kwargs)
    torch.testing.assert_close(swapped, batch[[2, 0]])
    with pytest.raises(ValueError, match='2 seeds for 3 images'):
        tiny_sd.generate(['a', 'b', 'c'], seed=[1, 2], **kwargs)
    with pytest.raises(TypeError, match='unexpected arguments'):
        tiny_sd.generate('a', seed=1, target_size=(16, 16), **kwargs)


def test_precomputed_latents_skip_the_encoders(tiny_sd):
    batch = {'image_latents': torch.randn(2, 4, 8, 8), 'text_embeds': torch.randn(2, 77, 16)}

    def fail(*args, **kwargs):
        raise AssertionError('encoder called on a batch of precomputed latents')

    tiny_sd.vae.encode = fail
    tiny_sd.text_encoder.forward = fail
    prediction, target, _ = tiny_sd.eval().forward(batch)
    assert prediction.shape == (2, 4, 8, 8)


def test_pretrained_components_load_from_a_local_pipeline_folder(tmp_path):
    source = build_tiny_sd()
    for name in ('unet', 'vae', 'text_encoder', 'tokenizer'):
        getattr(source, name).save_pretrained(tmp_path / name)
    loaded = build_tiny_sd(
        pretrained_model_name_or_path=str(tmp_path), pretrained_components=['unet', 'vae', 'text_encoder', 'tokenizer']
    )
    for name in ('unet', 'vae', 'text_encoder'):
        for (key, a), (_, b) in zip(
            getattr(source, name).state_dict().items(), getattr(loaded, name).state_dict().items()
        ):
            assert torch.equal(a, b), f'{name}.{key} differs after from_pretrained'
    tokens = loaded.conditioner.tokenize(['a photo of a cat'])['input_ids']
    assert tokens.tolist() == source.conditioner.tokenize(['a photo of a cat'])['input_ids'].tolist()
    # Only the named components are loaded; the UNet is fresh when not listed.
    partial = build_tiny_sd(pretrained_model_name_or_path=str(tmp_path), pretrained_components=['vae'])
    assert torch.equal(next(iter(partial.vae.parameters())), next(iter(source.vae.parameters())))
    assert not torch.equal(partial.unet.conv_in.weight, source.unet.conv_in.weight)


def test_unknown_pretrained_component_raises(tmp_path):
    with pytest.raises(ValueError, match="'scheduler'"):
        build_tiny_sd(pretrained_model_name_or_path=str(tmp_path), pretrained_components=['scheduler'])


def test_mismatched_text_width_raises():
    with pytest.raises(ValueError, match='cross_attention_dim'):
        build_tiny_sd(text_encoder_config={'hidden_size': 32})
