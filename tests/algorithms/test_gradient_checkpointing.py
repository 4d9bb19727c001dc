import copy

import pytest
import torch
import torch.utils.checkpoint

from diffusion import registry
from diffusion.algorithms import GradientCheckpointing, apply_gradient_checkpointing
from tests.conftest import build_tiny_sd


def batch():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1
    return {'image': images, 'captions': ['a red circle', 'a blue square']}


def loss_and_unet_grads(model):
    torch.manual_seed(0)  # the same timesteps and noise for both runs
    the_batch = batch()
    loss = model.loss(model(the_batch), the_batch)
    loss.backward()
    return loss.detach(), {name: param.grad for name, param in model.unet.named_parameters()}


@pytest.fixture
def checkpoint_calls(monkeypatch):
    """Counts calls of torch.utils.checkpoint.checkpoint, which diffusers' checkpointing looks up at each call."""
    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, 'checkpoint', counting_checkpoint)
    return calls


def test_loss_and_gradients_equal_those_without_checkpointing(checkpoint_calls):
    model = build_tiny_sd()
    checkpointed = copy.deepcopy(model)
    apply_gradient_checkpointing(checkpointed)
    assert checkpointed.unet.is_gradient_checkpointing
    assert not model.unet.is_gradient_checkpointing

    loss, grads = loss_and_unet_grads(model)
    assert not checkpoint_calls
    checkpointed_loss, checkpointed_grads = loss_and_unet_grads(checkpointed)
    # 2 down blocks, the mid block and 2 up blocks, each with resnets and transformers checkpointed one by one.
    assert len(checkpoint_calls) >= 5
    torch.testing.assert_close(checkpointed_loss, loss, rtol=0, atol=1e-6)
    assert grads.keys() == checkpointed_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=0, atol=1e-6, msg=name)


def test_no_checkpointing_without_gradients(checkpoint_calls):
    model = build_tiny_sd()
    apply_gradient_checkpointing(model)
    with torch.no_grad():
        model(batch())
    assert not checkpoint_calls


def test_model_without_a_unet_is_refused():
    with pytest.raises(ValueError, match='GradientCheckpointing needs a diffusion model with a denoiser'):
        apply_gradient_checkpointing(torch.nn.Linear(2, 2))


def test_registry_builds_it_and_rejects_unknown_keys():
    assert isinstance(registry.algorithms.build('gradient_checkpointing', {}), GradientCheckpointing)
    with pytest.raises(ValueError, match=r'Unknown key algorithms\.gradient_checkpointing\.ratio'):
        registry.algorithms.build('gradient_checkpointing', {'ratio': 0.5})
