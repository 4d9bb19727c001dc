import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from diffusion import registry
from diffusion.algorithms import CompileDenoiser, apply_compile_denoiser
from tests.conftest import build_tiny_sd


@pytest.fixture(autouse=True)
def reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def unet_inputs():
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    return latents, torch.tensor([10, 900]), torch.randn(2, 77, 16, generator=generator)


def output_and_grads(unet):
    latents, timesteps, text_embeds = unet_inputs()
    output = unet(latents, timesteps, encoder_hidden_states=text_embeds).sample
    output.square().mean().backward()
    return output.detach(), {name: param.grad for name, param in unet.named_parameters()}


def test_compiles_in_place_and_matches_eager_forward_and_backward():
    eager = build_tiny_sd()
    compiled = build_tiny_sd()
    compiled.load_state_dict(eager.state_dict())
    keys = list(compiled.state_dict())
    unet = compiled.unet
    # Inductor needs minutes to compile the tiny UNet's forward and backward on a 2-core CPU; AOTAutograd with eager
    # kernels ('aot_eager') traces the same forward and backward graphs in seconds. The GPU test below uses inductor.
    backend = CompileCounterWithBackend('aot_eager')
    apply_compile_denoiser(compiled, backend=backend)

    assert compiled.unet is unet  # the module is compiled in place, not wrapped
    assert list(compiled.state_dict()) == keys
    output, grads = output_and_grads(compiled.unet)
    assert backend.frame_count >= 1  # the UNet's forward really went through torch.compile
    expected_output, expected_grads = output_and_grads(eager.unet)
    # Measured: identical outputs with aot_eager; the tolerance leaves room for reordered float sums.
    torch.testing.assert_close(output, expected_output, rtol=0, atol=1e-5)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='inductor on CPU takes minutes; this runs on a GPU')
def test_inductor_on_gpu_matches_eager():
    model = build_tiny_sd().cuda()
    latents, timesteps, text_embeds = (tensor.cuda() for tensor in unet_inputs())
    with torch.no_grad():
        expected = model.unet(latents, timesteps, encoder_hidden_states=text_embeds).sample
    apply_compile_denoiser(model)
    output = model.unet(latents, timesteps, encoder_hidden_states=text_embeds).sample
    output.square().mean().backward()
    torch.testing.assert_close(output.detach(), expected, rtol=1e-4, atol=1e-4)
    assert all(param.grad is not None for param in model.unet.parameters())


def test_model_without_a_unet_is_refused():
    with pytest.raises(ValueError, match='CompileDenoiser needs a diffusion model with a denoiser'):
        apply_compile_denoiser(torch.nn.Linear(2, 2))


def test_registry_passes_the_compile_options():
    algorithm = registry.algorithms.build('compile_unet', {'mode': 'max-autotune-no-cudagraphs', 'dynamic': False})
    assert isinstance(algorithm, CompileDenoiser)
    assert (algorithm.mode, algorithm.fullgraph, algorithm.dynamic, algorithm.backend) == (
        'max-autotune-no-cudagraphs',
        False,
        False,
        'inductor',
    )
    with pytest.raises(ValueError, match=r'Unknown key algorithms\.compile_unet\.options'):
        registry.algorithms.build('compile_unet', {'options': {}})
