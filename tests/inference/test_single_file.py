"""The single-file (LDM / ComfyUI) checkpoint: diffusers' own loader, an independent reverse mapping, reads it back."""

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from diffusion.models import tiny_stable_diffusion_xl
from diffusion.models.single_file import (
    open_clip_to_ldm,
    pipeline_to_ldm,
    save_single_file,
    unet_to_ldm,
    vae_to_ldm,
)
from tests.conftest import build_tiny_sd

# The SD2 layout at test size: a plain (attention-free) last down block and first up block, two resnets and two
# transformer layers per block, a VAE with its mid-block attention, a 3-layer text encoder.
SD2_LIKE = dict(
    unet_config=dict(
        block_out_channels=(8, 16, 16),
        layers_per_block=2,
        transformer_layers_per_block=2,
        down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'),
        up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'),
    ),
    vae_config=dict(
        block_out_channels=(8, 16, 16),
        down_block_types=('DownEncoderBlock2D',) * 3,
        up_block_types=('UpDecoderBlock2D',) * 3,
        layers_per_block=2,
        mid_block_add_attention=True,
    ),
    text_encoder_config=dict(num_hidden_layers=3),
)


def assert_same_weights(original: torch.nn.Module, loaded: torch.nn.Module, dtype=None):
    expected, actual = original.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    for name, value in expected.items():
        value = value.to(dtype) if dtype is not None else value
        assert torch.equal(actual[name].to(value.dtype), value), name


def load_back(path, folder) -> StableDiffusionPipeline:
    # config=<exported folder> and local_files_only: diffusers takes the component configs from the folder and
    # the weights from the single file, downloading nothing.
    return StableDiffusionPipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True, safety_checker=None, requires_safety_checker=False
    )


def test_sd2_single_file_loads_back_in_diffusers_with_every_weight_equal(tmp_path):
    model = build_tiny_sd(**SD2_LIKE, prediction_type='v_prediction', zero_terminal_snr=True)
    pipe = model.pipeline()
    pipe.save_pretrained(tmp_path / 'pipeline', safe_serialization=True)
    path = save_single_file(pipe, str(tmp_path / 'model.safetensors'))

    with safe_open(path, 'pt') as f:
        keys = set(f.keys())
        width = model.text_encoder.config.hidden_size
        assert f.get_tensor('cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight').shape == (
            3 * width,
            width,
        )
        assert f.get_tensor('first_stage_model.encoder.mid.attn_1.q.weight').ndim == 4  # 1x1 conv, as in LDM
    assert {'v_pred', 'ztsnr'} <= keys  # ComfyUI's markers of v-prediction with zero terminal SNR
    assert len([k for k in keys if k.startswith('model.diffusion_model.')]) == len(model.unet.state_dict())
    assert len([k for k in keys if k.startswith('first_stage_model.')]) == len(model.vae.state_dict())

    loaded = load_back(path, tmp_path / 'pipeline')
    for name in ('unet', 'vae', 'text_encoder'):
        assert_same_weights(getattr(pipe, name), getattr(loaded, name))
    assert loaded.scheduler.config.prediction_type == 'v_prediction'
    assert loaded.scheduler.config.rescale_betas_zero_snr is True


def test_test_size_model_round_trips_and_fp16_halves_every_tensor(tmp_path):
    model = build_tiny_sd()  # one resnet per block, cross-attention everywhere, no VAE attention
    pipe = model.pipeline()
    pipe.save_pretrained(tmp_path / 'pipeline', safe_serialization=True)
    path = save_single_file(pipe, str(tmp_path / 'half.safetensors'), dtype=torch.float16)
    with safe_open(path, 'pt') as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
        assert 'v_pred' not in f.keys()  # an epsilon model carries no marker
    loaded = load_back(path, tmp_path / 'pipeline')
    for name in ('unet', 'vae', 'text_encoder'):
        assert_same_weights(getattr(pipe, name), getattr(loaded, name), dtype=torch.float16)


def test_fused_in_proj_computes_the_same_attention_as_the_separate_projections():
    # OpenCLIP runs its text attention with nn.MultiheadAttention: the fused weights must reproduce CLIP's attention.
    config = CLIPTextConfig(
        hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1, projection_dim=8
    )
    encoder = CLIPTextModelWithProjection(config).eval()
    tensors = open_clip_to_ldm(encoder)
    attention = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    attention.load_state_dict(
        {k.split('attn.')[1]: v for k, v in tensors.items() if k.startswith('transformer.resblocks.0.attn.')}
    )
    x = torch.randn(3, 5, 16)
    expected = encoder.text_model.encoder.layers[0].self_attn(x)[0]
    actual = attention(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    # OpenCLIP applies its projection as x @ P: the transpose of the Linear weight.
    torch.testing.assert_close(x[:, 0] @ tensors['text_projection'], encoder.text_projection(x[:, 0]))


def test_unet_component_loads_alone_from_the_single_file(tmp_path):
    unet = build_tiny_sd(**SD2_LIKE).unet
    unet.save_pretrained(tmp_path / 'pipeline' / 'unet')
    state = {f'model.diffusion_model.{k}': v.contiguous() for k, v in unet_to_ldm(unet).items()}

    save_file(state, str(tmp_path / 'unet.safetensors'))
    loaded = UNet2DConditionModel.from_single_file(
        str(tmp_path / 'unet.safetensors'), config=str(tmp_path / 'pipeline'), subfolder='unet', local_files_only=True
    )
    assert_same_weights(unet, loaded)


def test_architectures_the_layout_cannot_hold_are_refused(tmp_path):
    # A projection of the text embeddings inside the UNet (encoder_hid_proj) has no counterpart in the SD layout.
    model = build_tiny_sd(unet_config={'encoder_hid_dim': 16})
    with pytest.raises(ValueError, match=r'UNet: 2 tensors have no place in the single-file layout .*encoder_hid_proj'):
        pipeline_to_ldm(model.pipeline())
    with pytest.raises(ValueError, match=r"must be a \.safetensors file, got '.*model\.ckpt'"):
        save_single_file(build_tiny_sd().pipeline(), str(tmp_path / 'model.ckpt'))


def test_vae_component_keeps_the_decoder_level_order(tmp_path):
    # The reference decoder numbers levels from the highest resolution; diffusers' up_blocks from the lowest.
    vae = build_tiny_sd(**SD2_LIKE).vae
    state = vae_to_ldm(vae)
    assert torch.equal(state['decoder.up.0.block.0.conv1.weight'], vae.decoder.up_blocks[-1].resnets[0].conv1.weight)
    assert 'decoder.up.0.upsample.conv.weight' not in state  # the highest-resolution level does not upsample

    save_file({f'first_stage_model.{k}': v.contiguous() for k, v in state.items()}, str(tmp_path / 'vae.safetensors'))
    vae.save_pretrained(tmp_path / 'pipeline' / 'vae')
    loaded = AutoencoderKL.from_single_file(
        str(tmp_path / 'vae.safetensors'), config=str(tmp_path / 'pipeline'), subfolder='vae', local_files_only=True
    )
    assert_same_weights(vae, loaded)


def test_sdxl_single_file_loads_back_in_diffusers_with_every_weight_equal(tmp_path):
    # Different widths for the two text towers, as in SDXL (768, 1280): diffusers' loader tells them apart by width.
    model = tiny_stable_diffusion_xl(
        text_encoder_config=dict(hidden_size=24), text_encoder_2_config=dict(hidden_size=40),
        vae_config=dict(mid_block_add_attention=True),
    )  # fmt: skip
    pipe = model.pipeline()
    pipe.save_pretrained(tmp_path / 'pipeline', safe_serialization=True)
    path = save_single_file(pipe, str(tmp_path / 'xl.safetensors'))
    with safe_open(path, 'pt') as f:
        keys = set(f.keys())
        assert f.get_tensor('conditioner.embedders.1.model.text_projection').shape == (40, 32)  # (width, projection)
        assert f.get_tensor('conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight').shape == (
            120,
            40,
        )
    assert 'conditioner.embedders.0.transformer.text_model.final_layer_norm.weight' in keys  # CLIP-L: HF names
    assert 'model.diffusion_model.label_emb.0.0.weight' in keys  # SDXL's size and pooled-text embedding
    assert not any(k.startswith('cond_stage_model.') for k in keys)

    loaded = StableDiffusionXLPipeline.from_single_file(path, config=str(tmp_path / 'pipeline'), local_files_only=True)
    for name in ('unet', 'vae', 'text_encoder', 'text_encoder_2'):
        assert_same_weights(getattr(pipe, name), getattr(loaded, name))
