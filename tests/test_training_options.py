"""Training options as yaml switches: input perturbation, TF32, 8-bit AdamW and the text encoder's own learning
rate (see :mod:`diffusion.optim` and the objectives)."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from diffusion.builders import build_optimizer, build_trainer
from diffusion.models.rectified_flow import RectifiedFlowObjective
from diffusion.optim import adamw_8bit, apply_tf32
from diffusion.utils import ConfigError
from tests.conftest import build_tiny_sd, tiny_config

# --- input perturbation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize('gamma', [0.0, 0.1])
def test_ddpm_input_perturbation_noises_with_perturbed_noise_and_keeps_the_target(gamma):
    model = build_tiny_sd(input_perturbation=gamma, prediction_type='epsilon')
    objective = model.objective
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([10, 500, 990])
    torch.manual_seed(3)
    noised = objective.noise(latents, timesteps, noise)
    after = torch.randn(1)
    torch.manual_seed(3)
    fresh = torch.randn_like(noise) if gamma else torch.zeros_like(noise)
    expected_input = objective.noise_scheduler.add_noise(latents, noise + gamma * fresh, timesteps)
    torch.testing.assert_close(noised.noisy_latents, expected_input)
    torch.testing.assert_close(noised.target, noise)  # epsilon target: the original noise, not the perturbed one
    if gamma:
        plain = objective.noise_scheduler.add_noise(latents, noise, timesteps)
        assert (noised.noisy_latents - plain).abs().max() > 1e-3
    else:  # off: nothing is drawn, so the random stream of a run without it is unchanged
        torch.manual_seed(3)
        assert torch.equal(after, torch.randn(1))
    # Validation (a generator) is never perturbed.
    validation = objective.noise(latents, timesteps, noise, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(validation.noisy_latents, objective.noise_scheduler.add_noise(latents, noise, timesteps))


def test_rectified_flow_input_perturbation_moves_x_t_but_not_the_velocity_target():
    objective = RectifiedFlowObjective(input_perturbation=0.2)
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([250.0, 750.0])
    torch.manual_seed(5)
    noised = objective.noise(latents, timesteps, noise)
    torch.manual_seed(5)
    fresh = torch.randn_like(noise)
    t = torch.tensor([0.25, 0.75]).view(-1, 1, 1, 1)
    torch.testing.assert_close(noised.noisy_latents, (1 - t) * latents + t * (noise + 0.2 * fresh))
    torch.testing.assert_close(noised.target, noise - latents)
    assert objective.describe()['input_perturbation'] == 0.2


def test_input_perturbation_is_a_yaml_switch_and_a_bad_value_names_the_key(synthetic_dataset, tmp_path):
    cfg = tiny_config(synthetic_dataset, str(tmp_path), '+model.input_perturbation=0.1', 'save_folder=null')
    assert build_trainer(cfg).state.model.objective.input_perturbation == 0.1
    flow = tiny_config(synthetic_dataset, str(tmp_path / 'f'), '+model.objective={name:rectified_flow,'
                       'input_perturbation:0.05}', 'save_folder=null')  # fmt: skip
    assert build_trainer(flow).state.model.objective.input_perturbation == 0.05
    with pytest.raises(ValueError, match=r'Invalid model.objective.input_perturbation=-0.1: expected a number >= 0'):
        build_trainer(tiny_config(synthetic_dataset, str(tmp_path / 'b'), '+model.input_perturbation=-0.1'))


# --- TF32 -------------------------------------------------------------------------------------------------------


@pytest.fixture
def restore_tf32():
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.set_float32_matmul_precision(saved[2])


def test_tf32_switch_sets_the_cuda_flags_on_a_gpu_run(restore_tf32):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    assert not apply_tf32(False, 'gpu') and not torch.backends.cuda.matmul.allow_tf32  # off: untouched
    assert apply_tf32(True, 'gpu')
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert torch.get_float32_matmul_precision() == 'high'


def test_tf32_on_a_cpu_run_changes_nothing_and_says_so(synthetic_dataset, tmp_path, restore_tf32, caplog):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision('highest')
    with caplog.at_level(logging.INFO, logger='diffusion.optim'):
        trainer = build_trainer(tiny_config(synthetic_dataset, str(tmp_path), 'tf32=true', 'device=cpu',
                                            'max_duration=1ba', 'save_folder=null'))  # fmt: skip
        trainer.fit()  # harmless: the run trains
    assert 'tf32: true has no effect on this cpu run' in caplog.text
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert torch.get_float32_matmul_precision() == 'highest'
    with pytest.raises(ConfigError, match="override tf32=sometimes: Value 'sometimes' is not a valid bool"):
        tiny_config(synthetic_dataset, str(tmp_path), 'tf32=sometimes')


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_tf32_matmuls_differ_from_fp32_on_the_gpu(restore_tf32):
    a, b = torch.randn(512, 512, device='cuda'), torch.randn(512, 512, device='cuda')
    torch.backends.cuda.matmul.allow_tf32 = False
    exact = a @ b
    apply_tf32(True, 'gpu')
    fast = a @ b
    capability = torch.cuda.get_device_capability()
    if capability[0] >= 8:  # Ampere or newer has TF32 tensor cores
        assert 0 < (fast - exact).abs().max() < 1.0


# --- 8-bit AdamW ------------------------------------------------------------------------------------------------


def test_adamw_8bit_refuses_in_one_line_without_cuda_or_without_bitsandbytes(monkeypatch):
    params = [torch.nn.Parameter(torch.zeros(8))]
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(RuntimeError, match=r'^optimizer.name=adamw_8bit needs a CUDA GPU .* none is available here'):
        adamw_8bit(params)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setitem(sys.modules, 'bitsandbytes', None)  # not installed
    with pytest.raises(
        RuntimeError, match=r"^optimizer.name=adamw_8bit needs bitsandbytes.*pip install -e '\.\[bnb\]'"
    ):
        adamw_8bit(params)


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the refusal on a machine without CUDA')
def test_a_cpu_run_with_adamw_8bit_fails_before_training(synthetic_dataset, tmp_path):
    cfg = tiny_config(synthetic_dataset, str(tmp_path), 'optimizer.name=adamw_8bit', 'save_folder=null')
    with pytest.raises(RuntimeError, match='needs a CUDA GPU'):
        build_trainer(cfg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='bitsandbytes 8-bit states need CUDA')
def test_adamw_8bit_keeps_8_bit_states_and_steps_on_the_gpu():
    pytest.importorskip('bitsandbytes')
    model = torch.nn.Linear(256, 256).cuda()
    optimizer = build_optimizer({'name': 'adamw_8bit', 'lr': 1e-3}, model)
    before = model.weight.detach().clone()
    model(torch.randn(4, 256, device='cuda')).square().mean().backward()
    optimizer.step()
    assert not torch.equal(before, model.weight)
    state = optimizer.state[model.weight]
    assert state['state1'].dtype == torch.uint8 and state['state2'].dtype == torch.uint8


# --- the text encoder's own learning rate -----------------------------------------------------------------------


def test_text_encoder_lr_makes_a_second_param_group():
    model = build_tiny_sd(train_text_encoder=True)
    optimizer = build_optimizer({'name': 'adamw', 'lr': 1e-3, 'text_encoder_lr': 1e-5}, model)
    assert [g['lr'] for g in optimizer.param_groups] == [1e-3, 1e-5]
    encoder = {id(p) for p in model.text_encoder.parameters()}
    assert {id(p) for p in optimizer.param_groups[1]['params']} == encoder
    assert not encoder & {id(p) for p in optimizer.param_groups[0]['params']}
    assert len(build_optimizer({'name': 'adamw', 'lr': 1e-3}, model).param_groups) == 1
    with pytest.raises(ValueError, match=r'^optimizer.text_encoder_lr=1e-05 but no text-encoder weight trains'):
        build_optimizer({'name': 'adamw', 'lr': 1e-3, 'text_encoder_lr': 1e-5}, build_tiny_sd())
    with pytest.raises(ValueError, match=r'Invalid optimizer.text_encoder_lr=-1'):
        build_optimizer({'name': 'adamw', 'lr': 1e-3, 'text_encoder_lr': -1}, model)


def test_the_text_encoder_trains_at_its_own_rate(synthetic_dataset, tmp_path):
    # One AdamW step moves each weight with a non-zero gradient by about lr (Adam's first step is lr * g / |g|):
    # the largest change in each group is its own learning rate.
    cfg = tiny_config(synthetic_dataset, str(tmp_path), 'model.train_text_encoder=true', 'model.caption_drop_prob=0',
                      '+optimizer.text_encoder_lr=1e-5', 'optimizer.lr=1e-3', '+optimizer.weight_decay=0',
                      'max_duration=1ba', 'save_folder=null', 'train_dataloader.batch_size=4')  # fmt: skip
    trainer = build_trainer(cfg)
    model = trainer.state.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.fit()
    change = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters()}
    encoder = max(v for n, v in change.items() if n.startswith('text_encoder.'))
    unet = max(v for n, v in change.items() if n.startswith('unet.'))
    assert encoder == pytest.approx(1e-5, rel=0.02)
    assert unet == pytest.approx(1e-3, rel=0.02)
