import contextlib
import importlib.util

import pytest
import torch
from composer.algorithms.warnings import NoEffectWarning
from diffusers.models.attention_processor import (
    Attention,
    AttnAddedKVProcessor,
    AttnProcessor,
    AttnProcessor2_0,
    XFormersAttnProcessor,
)

from diffusion import registry
from diffusion.algorithms import AttentionBackend, apply_attention_backend
from diffusion.models import tiny_stable_diffusion
from tests.conftest import build_tiny_sd

XFORMERS_INSTALLED = importlib.util.find_spec('xformers') is not None


def tiny_sd_with_vae_attention():
    # The tiny VAE leaves out its mid-block attention; switch it on so that the VAE's attention is covered too.
    return build_tiny_sd(vae_config={'mid_block_add_attention': True})


def attention_modules(model):
    return [module for module in model.modules() if isinstance(module, Attention)]


def unet_inputs():
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    encoder_hidden_states = torch.randn(2, 77, 16, generator=generator)
    return latents, torch.tensor([10, 900]), encoder_hidden_states


@pytest.mark.parametrize('backend, processor_class', [('math', AttnProcessor), ('sdpa', AttnProcessor2_0)])
def test_sets_the_processor_of_every_attention_module_in_unet_and_vae(backend, processor_class):
    model = tiny_sd_with_vae_attention()
    modules = attention_modules(model)
    # 7 transformer blocks in the UNet with self- and cross-attention, plus the encoder's and decoder's mid block.
    assert len(modules) == 7 * 2 + 2
    assert len(attention_modules(model.vae)) == 2
    assert apply_attention_backend(model, backend) == len(modules)
    assert all(type(module.processor) is processor_class for module in modules)


def test_math_and_sdpa_give_the_same_outputs():
    model = tiny_sd_with_vae_attention().eval()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents, timesteps, text_embeds = unet_inputs()
    outputs = {}
    with torch.no_grad():
        for backend in ('sdpa', 'math'):
            apply_attention_backend(model, backend)
            unet_output = model.unet(latents, timesteps, encoder_hidden_states=text_embeds).sample
            outputs[backend] = (unet_output, model.vae(images).sample)
    # Measured: max abs difference 4.8e-7 (UNet, output std 0.32) and 2.2e-7 (VAE) in fp32.
    torch.testing.assert_close(outputs['math'][0], outputs['sdpa'][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(outputs['math'][1], outputs['sdpa'][1], rtol=0, atol=1e-5)


def test_unknown_backend_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown attention backend 'flash'\. Valid backends: sdpa, xformers, math"):
        apply_attention_backend(build_tiny_sd(), 'flash')
    with pytest.raises(ValueError, match='Valid backends: sdpa, xformers, math'):
        registry.algorithms.build('attention_backend', {'backend': 'flash'})


@pytest.mark.skipif(XFORMERS_INSTALLED, reason='xformers is installed; the missing-package error cannot occur')
def test_xformers_without_the_package_says_how_to_install_it():
    model = build_tiny_sd()
    with pytest.raises(ImportError, match=r"pip install -e '\.\[xformers\]'"):
        apply_attention_backend(model, 'xformers')
    with pytest.raises(ImportError, match=r"pip install -e '\.\[xformers\]'"):
        AttentionBackend('xformers')  # fails when the config is read, before training starts
    assert all(type(module.processor) is AttnProcessor2_0 for module in attention_modules(model))


def test_xformers_sets_xformers_processors():
    pytest.importorskip('xformers', reason='xformers is not installed (pip install -e .[xformers])')
    model = tiny_sd_with_vae_attention()
    assert apply_attention_backend(model, 'xformers') == 16
    assert all(type(module.processor) is XFormersAttnProcessor for module in attention_modules(model))


def test_refuses_to_replace_processors_with_their_own_inputs_and_changes_nothing():
    model = build_tiny_sd()
    model.unet.mid_block.attentions[0].transformer_blocks[0].attn2.set_processor(AttnAddedKVProcessor())
    with pytest.raises(ValueError, match=r'unet\.mid_block\.attentions\.0\.transformer_blocks\.0\.attn2 '):
        apply_attention_backend(model, 'math')
    assert sum(type(module.processor) is AttnProcessor for module in attention_modules(model)) == 0


def test_model_without_attention_warns_and_returns_zero():
    with pytest.warns(NoEffectWarning, match='no diffusers Attention modules'):
        assert apply_attention_backend(torch.nn.Linear(2, 2), 'math') == 0


def test_builds_from_the_registry_with_sdpa_by_default():
    algorithm = registry.algorithms.build('attention_backend', {})
    assert isinstance(algorithm, AttentionBackend)
    assert algorithm.backend == 'sdpa'
    assert repr(algorithm) == "AttentionBackend(backend='sdpa')"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='the flash, memory-efficient and xformers kernels need CUDA')
def test_on_a_gpu_flash_efficient_and_xformers_attention_match_math_in_bf16():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # The demo-size UNet: head dims 8 and 16, which the flash kernel takes; TEST_UNET's head dims are too small.
    unet = tiny_stable_diffusion().unet.to('cuda', torch.bfloat16).eval()
    generator = torch.Generator('cuda').manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, device='cuda', dtype=torch.bfloat16, generator=generator)
    text_embeds = torch.randn(2, 77, 64, device='cuda', dtype=torch.bfloat16, generator=generator)
    timesteps = torch.tensor([10, 900], device='cuda')

    def output(backend: str, kernel=None) -> torch.Tensor:
        apply_attention_backend(unet, backend)
        with torch.no_grad(), sdpa_kernel([kernel]) if kernel else contextlib.nullcontext():
            return unet(latents, timesteps, encoder_hidden_states=text_embeds).sample.float()

    reference = output('math')
    outputs = {
        # Restricted to one kernel, SDPA raises rather than falling back when that kernel cannot run.
        'flash': output('sdpa', SDPBackend.FLASH_ATTENTION),
        'efficient': output('sdpa', SDPBackend.EFFICIENT_ATTENTION),
    }
    if XFORMERS_INSTALLED:
        outputs['xformers'] = output('xformers')
    scale = float(reference.abs().max())
    for name, value in outputs.items():
        # bf16 keeps 8 bits of mantissa; kernels differ in the order of their sums and where they round.
        assert float((value - reference).abs().max()) <= 0.05 * scale, name
