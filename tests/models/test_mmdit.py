"""The MMDiT family: the SD3-medium parameter pin, FLOPs, FSDP units and checkpointing of the mmdit denoiser, the T5
tokenizer and conditioners, 16-channel latents with a shift, sampling, config refusals, and a composer run that
checkpoints and resumes bit-exactly."""

from __future__ import annotations

import os
import re

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.models.attention import JointTransformerBlock
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from diffusion.builders import build_trainer
from diffusion.config import load_config
from diffusion.models.mmdit import mmdit
from diffusion.models.sd3_factories import tiny_stable_diffusion_3
from diffusion.models.t5 import build_t5_tokenizer
from diffusion.models.t5_conditioners import sd3, t5
from diffusion.utils import ConfigError
from tests.conftest import REPO_ROOT, TEST_VAE

MMDIT_YAML = os.path.join(REPO_ROOT, 'yamls', 'tiny_mmdit_cpu.yaml')
# Test size: the 2-level test VAE (factor 2) with 16 channels and a shift, so 16px images are 8x8 latents, 16 tokens.
TEST_SD3_VAE = dict(TEST_VAE, latent_channels=16, scaling_factor=1.5, shift_factor=0.25)
TEST_SD3_VAE_OVERRIDE = (
    '+model.vae_config={block_out_channels:[8,16],down_block_types:[DownEncoderBlock2D,DownEncoderBlock2D],'
    'up_block_types:[UpDecoderBlock2D,UpDecoderBlock2D],norm_num_groups:4,sample_size:16,latent_channels:16,'
    'scaling_factor:1.5,shift_factor:0.25}'
)


def build_tiny_sd3(**overrides):
    return tiny_stable_diffusion_3(vae_config=TEST_SD3_VAE, max_length=8, **overrides)


def batch_of(n=2):
    torch.manual_seed(0)
    return {'image': torch.rand(n, 3, 16, 16) * 2 - 1, 'captions': ['a red circle', 'two small blue squares'][:n]}


def test_sd3_medium_shape_has_the_published_parameter_count_on_meta():
    with torch.device('meta'):
        denoiser = mmdit(preset='sd3_medium')
    assert sum(p.numel() for p in denoiser.network.parameters()) == 2_028_328_000
    assert len(denoiser.fsdp_units()) == 24
    assert all(isinstance(unit, JointTransformerBlock) for unit in denoiser.fsdp_units())


def test_forward_flops_match_a_counted_forward_and_feed_flops_per_batch():
    model = build_tiny_sd3()
    shapes = model.conditioner.conditioning_shapes()
    assert shapes == {'text_embeds': (77 + 8, 48), 'pooled_text_embeds': (32,)}
    counted = model.denoiser.forward_flops((16, 8, 8), shapes)
    conditioning = {key: torch.zeros(1, *shape) for key, shape in shapes.items()}
    # A real forward with the math attention kernel, whose matmuls the counter sees (the CPU's fused kernel it misses).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model.denoiser(torch.zeros(1, 16, 8, 8), torch.zeros(1), conditioning)
    assert counted == counter.get_total_flops() > 0
    assert model.flops_per_batch(batch_of(2)) == 3 * 2 * counted
    assert model.denoiser.forward_flops((16, 16, 16), shapes) > counted  # 4x the image tokens


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    denoiser = mmdit()
    assert denoiser.activation_checkpointing_fn(denoiser.network.transformer_blocks[0])
    assert not denoiser.activation_checkpointing_fn(denoiser.network.pos_embed)
    latents, timesteps = torch.randn(2, 16, 8, 8), torch.tensor([100.0, 700.0])
    conditioning = {'text_embeds': torch.randn(2, 5, 48), 'pooled_text_embeds': torch.randn(2, 32)}

    def grads():
        denoiser.network.zero_grad()
        denoiser(latents, timesteps, conditioning).square().mean().backward()
        return [p.grad.clone() for p in denoiser.network.parameters()]

    plain = grads()
    denoiser.enable_gradient_checkpointing()
    assert denoiser.network.gradient_checkpointing
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b)


def test_offline_t5_tokenizer_is_deterministic_and_t5_shaped():
    first, second = build_t5_tokenizer(max_length=12), build_t5_tokenizer(max_length=12)
    assert (first.pad_token_id, first.eos_token_id, first.unk_token_id) == (0, 1, 2)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    ids = first(['a red circle on a Zebra'], padding='max_length', max_length=12).input_ids[0]
    tokens = first.convert_ids_to_tokens(ids)
    assert tokens[:4] == ['\u2581a', '\u2581red', '\u2581circle', '\u2581on']  # known words stay whole
    assert tokens[tokens.index('</s>') + 1 :] == ['<pad>'] * (12 - tokens.index('</s>') - 1)
    assert first.decode(ids, skip_special_tokens=True) == 'a red circle on a Zebra'


@pytest.mark.parametrize('masked', [True, False])
def test_t5_conditioner_output_does_not_depend_on_pad_tokens_when_masked(masked):
    torch.manual_seed(0)
    conditioner = t5(max_length=16, use_attention_mask=masked)
    conditioner.encoders()[0].eval()  # as the model keeps a frozen encoder: no dropout
    ids = conditioner.tokenize(['a red circle'])['input_ids']
    real = ids != 0
    assert int((~real).sum()) > 5
    with torch.no_grad():
        a = conditioner.encode({'input_ids': ids})['text_embeds']
    # The same caption padded with another token: '<unk>' (id 2) instead of '<pad>' (id 0).
    conditioner.tokenizer.pad_token = '<unk>'
    other = conditioner.tokenize(['a red circle'])['input_ids']
    assert torch.equal(other[real], ids[real]) and set(other[~real].tolist()) == {2}
    with torch.no_grad():
        b = conditioner.encode({'input_ids': other})['text_embeds']
    if masked:
        assert torch.equal(a, b)
        assert float(a[~real].abs().max()) == 0.0
    else:  # unmasked, T5 attends to the pads, as diffusers' SD3 pipeline runs it
        assert float((a - b)[real].abs().max()) > 1e-4


def test_sd3_conditioner_concatenates_clips_pads_to_t5_width_and_appends_t5():
    torch.manual_seed(0)
    conditioner = sd3(max_length=8)
    for encoder in conditioner.encoders():
        encoder.eval()
    tokens = conditioner.tokenize(['a red circle', 'a blue square'])
    with torch.no_grad():
        out = conditioner.encode(tokens)
        clip_l = conditioner._get('text_encoder')(tokens['input_ids'], output_hidden_states=True)
        clip_g = conditioner._get('text_encoder_2')(tokens['input_ids_2'], output_hidden_states=True)
    context, pooled = out['text_embeds'], out['pooled_text_embeds']
    assert context.shape == (2, 77 + 8, 48) and pooled.shape == (2, 32)
    torch.testing.assert_close(context[:, :77, :16], clip_l.hidden_states[-2])
    torch.testing.assert_close(context[:, :77, 16:32], clip_g.hidden_states[-2])
    assert float(context[:, :77, 32:].abs().max()) == 0.0  # zero-padded to T5's width
    torch.testing.assert_close(pooled, torch.cat([clip_l.text_embeds, clip_g.text_embeds], dim=-1))
    t5_ids = tokens['input_ids_3']
    t5_mask = (t5_ids != 0).long()
    with torch.no_grad():
        t5_hidden = conditioner._get('text_encoder_3')(t5_ids, attention_mask=t5_mask)[0] * t5_mask[..., None]
    torch.testing.assert_close(context[:, 77:], t5_hidden)


def test_clip_max_length_shortens_both_clips_and_is_checked_against_precomputed_embeddings():
    torch.manual_seed(0)
    model = build_tiny_sd3(clip_max_length=12, train_text_encoder=True)
    conditioner = model.conditioner
    tokens = conditioner.tokenize(['a red circle', 'a very long caption ' * 8])
    assert tokens['input_ids'].shape == tokens['input_ids_2'].shape == (2, 12)  # padded and truncated
    assert tokens['input_ids_3'].shape == (2, 8)  # T5 keeps its own max_length
    assert conditioner.conditioning_shapes()['text_embeds'] == (12 + 8, 48)
    batch = batch_of()
    assert conditioner.conditioning(batch, False, (16, 16))['text_embeds'].shape == (2, 20, 48)
    model.loss(model(batch), batch).backward()  # trains with it
    columns = conditioner.stored_text_columns(batch['captions'])
    stored = {k: torch.stack(columns[k]) for k in ('clip_embeds', 'pooled_text_embeds')}
    assert stored['clip_embeds'].shape == (2, 12, 32)  # precompute stores the 12 CLIP tokens at CLIP's width
    seventy_seven = {**stored, 'clip_embeds': torch.zeros(2, 77, 32), 't5_embeds': torch.zeros(2, 8, 48)}
    with pytest.raises(ConfigError, match=r'clip_max_length.*77 tokens per caption, this model uses 12'):
        conditioner._from_stored(seventy_seven)
    with pytest.raises(ValueError, match=r"model.clip_max_length must be between 3 and the text encoder's 77 .*got 78"):
        build_tiny_sd3(clip_max_length=78)


def test_shifted_latents_are_scaled_in_one_place_and_decoded_back():
    model = build_tiny_sd3()
    z = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(model.scale_latents(z), (z - 0.25) * 1.5)
    torch.testing.assert_close(model.unscale_latents(model.scale_latents(z)), z)
    latents = model._latents({'image_latents': z})
    torch.testing.assert_close(latents, (z - 0.25) * 1.5)


def test_generate_samples_through_the_sd3_pipeline_deterministically_per_seed():
    torch.manual_seed(0)
    model = build_tiny_sd3()
    pipe = model.pipeline()
    assert isinstance(pipe, StableDiffusion3Pipeline) and isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    kwargs = dict(num_inference_steps=3, guidance_scale=3.0, height=16, width=16)
    a = model.generate(['a red circle', 'a blue square'], seed=[1, 2], **kwargs)
    b = model.generate(['a red circle', 'a blue square'], seed=[1, 2], **kwargs)
    c = model.generate(['a red circle'], seed=[1], **kwargs)
    d = model.generate(['a red circle'], seed=[3], **kwargs)
    assert a.shape == (2, 3, 16, 16) and 0 <= float(a.min()) and float(a.max()) <= 1
    assert torch.equal(a, b)
    torch.testing.assert_close(a[:1], c, atol=1e-5, rtol=0)  # an image depends on its prompt and seed only
    assert float((c - d).abs().max()) > 1e-3
    two = model.generate(['a red circle'], seed=[1, 3], num_images_per_prompt=2, **kwargs)
    torch.testing.assert_close(two, torch.cat([c, d]), atol=1e-5, rtol=0)


def test_bad_mmdit_configs_fail_in_one_line_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r'latent_channels=4.*in_channels=16') as error:
        tiny_stable_diffusion_3(vae_config=dict(TEST_VAE, latent_channels=4))
    assert '\n' not in str(error.value)
    with pytest.raises(ConfigError, match=r'model\.denoiser\.config\.joint_attention_dim=40.*text_embeds 48 wide'):
        tiny_stable_diffusion_3(vae_config=TEST_SD3_VAE, transformer_config={'joint_attention_dim': 40})
    with pytest.raises(ConfigError, match=r"model\.objective\.inference_scheduler='dpm\+\+'"):
        build_tiny_sd3(objective={'name': 'rectified_flow', 'inference_scheduler': 'dpm++'})
    cfg = load_config(MMDIT_YAML, [f'run_folder={tmp_path}', 'train_dataloader.resolution=36'])
    message = 'Invalid train_dataloader.resolution=36: expected a multiple of 8'
    with pytest.raises(ConfigError, match=re.escape(message) + r'.*patch size \(2\), e\.g\. 32 or 40'):
        build_trainer(cfg)


def transformer_state(trainer):
    return {k: v.clone() for k, v in trainer.state.model.transformer.state_dict().items()}


@pytest.mark.slow
def test_tiny_mmdit_yaml_trains_checkpoints_and_resumes_bit_exactly(synthetic_dataset, tmp_path):
    common = [
        TEST_SD3_VAE_OVERRIDE,
        'model.max_length=8',
        f'train_dataloader.remote={synthetic_dataset}',
        'train_dataloader.resolution=16',
        'train_dataloader.batch_size=4',
        'progress_bar=false',
        'save_interval=2ba',
        'optimizer.lr=1e-3',
    ]

    def config(folder, *extra):
        return load_config(MMDIT_YAML, [*common, f'run_folder={tmp_path / folder}', *extra])

    full = build_trainer(config('full', 'max_duration=4ba'))
    full.fit()
    expected = transformer_state(full)
    full.close()
    first = build_trainer(config('part', 'max_duration=2ba'))
    first.fit()
    first.close()
    resumed = build_trainer(config('part', 'max_duration=4ba', 'autoresume=true'))
    assert int(resumed.state.timestamp.batch) == 2
    resumed.fit()
    got = transformer_state(resumed)
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    assert any(not torch.equal(got[k], v) for k, v in transformer_state(first).items())


def test_a_16_channel_tiny_autoencoder_exports_its_latent_mean_as_shift_factor():
    from diffusion.models.autoencoder import tiny_autoencoder

    torch.manual_seed(0)
    model = tiny_autoencoder(vae_config=dict(TEST_VAE, latent_channels=16), shift_latents=True, std_momentum=0.0)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.manual_seed(1)
    model.train()
    model({'image': images})
    torch.manual_seed(1)
    latents = model.vae.encode(images).latent_dist.sample()
    assert latents.shape == (2, 16, 8, 8)
    model.prepare_for_export()
    config = model.vae.config
    assert config.shift_factor == pytest.approx(float(latents.mean()), abs=1e-6) and config.shift_factor != 0
    assert config.scaling_factor == pytest.approx(float(latents.var().rsqrt()), rel=1e-5)
    assert 'latent_mean' not in tiny_autoencoder(vae_config=TEST_VAE).state_dict()  # unshifted: keys unchanged


def test_every_sd3_component_the_transformer_included_loads_from_a_pipeline_folder(tmp_path):
    source = build_tiny_sd3(use_attention_mask=False)
    source.pipeline().save_pretrained(tmp_path, safe_serialization=True)
    names = ['transformer', 'vae', 'text_encoder', 'text_encoder_2', 'text_encoder_3', 'tokenizer', 'tokenizer_2',
             'tokenizer_3']  # fmt: skip
    torch.manual_seed(123)  # other random weights than the source's, had anything been built instead of loaded
    loaded = build_tiny_sd3(use_attention_mask=False, pretrained_model_name_or_path=str(tmp_path),
                            pretrained_components=names)  # fmt: skip
    for name in ('transformer', 'vae', 'text_encoder', 'text_encoder_2', 'text_encoder_3'):
        original, reloaded = getattr(source, name).state_dict(), getattr(loaded, name).state_dict()
        assert original.keys() == reloaded.keys() and all(torch.equal(original[k], reloaded[k]) for k in original), name
    sampling = dict(num_inference_steps=2, seed=3, height=16, width=16)
    torch.testing.assert_close(loaded.generate('a red circle', **sampling), source.generate('a red circle', **sampling))
    # The transformer alone from the folder: the rest are built, so the model differs.
    torch.manual_seed(123)
    partial = build_tiny_sd3(pretrained_model_name_or_path=str(tmp_path), pretrained_components=['transformer'])
    assert torch.equal(partial.transformer.pos_embed.proj.weight, source.transformer.pos_embed.proj.weight)
    assert not torch.equal(partial.vae.encoder.conv_in.weight, source.vae.encoder.conv_in.weight)
