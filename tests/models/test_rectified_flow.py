"""The rectified-flow objective: its formulas on known numbers, its timestep densities, its fixed validation loss, its
sampler, and a UNet trained with it through the same config switch a user sets."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion.builders import build_trainer
from diffusion.models.rectified_flow import RectifiedFlowObjective, shift_sigmas
from diffusion.utils import ConfigError
from tests.conftest import build_tiny_sd, tiny_config
from tests.test_train import LossRecorder


def test_noisy_latents_and_velocity_target_on_known_tensors():
    objective = RectifiedFlowObjective()
    latents = torch.tensor([2.0, -4.0]).view(2, 1, 1, 1).expand(2, 4, 2, 2).clone()
    noise = torch.tensor([-1.0, 3.0]).view(2, 1, 1, 1).expand(2, 4, 2, 2).clone()
    timesteps = torch.tensor([250.0, 1000.0])  # t = 0.25 and t = 1 (pure noise)
    noised = objective.noise(latents, timesteps, noise=noise)
    # x_t = (1 - t) x_0 + t noise: 0.75 * 2 + 0.25 * -1 = 1.25; 0 * -4 + 1 * 3 = 3
    assert noised.noisy_latents[0].unique().tolist() == [1.25]
    assert noised.noisy_latents[1].unique().tolist() == [3.0]
    # velocity = noise - x_0: -1 - 2 = -3; 3 - (-4) = 7
    assert noised.target[0].unique().tolist() == [-3.0]
    assert noised.target[1].unique().tolist() == [7.0]
    assert torch.equal(noised.timesteps, timesteps)


def test_shift_formula_and_shifted_training_times():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    # 3 t / (1 + 2 t): 0, 0.75 / 1.5 = 0.5, 1.5 / 2 = 0.75, 1
    torch.testing.assert_close(shift_sigmas(t, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))
    torch.testing.assert_close(shift_sigmas(t, 1.0), t)
    objective = RectifiedFlowObjective(timestep_sampling='uniform', shift=3.0)
    torch.manual_seed(0)
    timesteps = objective.sample_timesteps(1000, torch.device('cpu'))
    torch.manual_seed(0)
    u = torch.rand(1000)
    expected = 1000 * 3 * u / (1 + 2 * u)
    torch.testing.assert_close(timesteps, expected)
    assert float(timesteps.mean()) > 600  # a shift of 3 moves the uniform mean (500) toward noise


def test_logit_normal_times_have_the_configured_logit_mean_and_std():
    objective = RectifiedFlowObjective(logit_mean=0.5, logit_std=0.7)
    torch.manual_seed(0)
    sigmas = objective.sample_timesteps(20000, torch.device('cpu')) / 1000
    logits = torch.log(sigmas / (1 - sigmas))
    assert abs(float(logits.mean()) - 0.5) < 0.02
    assert abs(float(logits.std()) - 0.7) < 0.02


def test_loss_weights_cosmap_and_uniform():
    timesteps = torch.tensor([500.0, 0.0])
    cosmap = RectifiedFlowObjective(loss_weighting='cosmap').loss_weights(timesteps)
    # 2 / (pi (1 - 2t + 2t^2)): t = 0.5 -> 4 / pi; t = 0 -> 2 / pi
    torch.testing.assert_close(cosmap, torch.tensor([4 / math.pi, 2 / math.pi]))
    assert RectifiedFlowObjective().loss_weights(timesteps) is None


def test_validation_times_are_eight_evenly_spaced_midpoints():
    times = [float(t) for t in RectifiedFlowObjective(shift=3.0).validation_timesteps(torch.device('cpu'))]
    assert times == [62.5, 187.5, 312.5, 437.5, 562.5, 687.5, 812.5, 937.5]


def test_validation_loss_is_identical_across_calls_and_changes_with_the_weights():
    model = build_tiny_sd(objective='rectified_flow')
    torch.manual_seed(0)
    batch = {'image': torch.rand(2, 3, 16, 16) * 2 - 1, 'captions': ['a red circle', 'a blue square']}
    first = model.eval_forward(batch)
    torch.rand(5)  # the global RNG moves on; the validation noise must not
    second = model.eval_forward(batch)
    assert first[0].shape == (8 * 2, 4, 8, 8)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    with torch.no_grad():
        next(model.unet.parameters()).add_(0.1)
    assert not torch.equal(model.eval_forward(batch)[0], first[0])


def test_ddpm_sampler_and_unknown_options_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"model\.objective\.inference_scheduler='ddim'.*flow_euler, flow_heun"):
        RectifiedFlowObjective(inference_scheduler='ddim')
    with pytest.raises(ConfigError, match=r"model\.objective\.timestep_sampling='normal'.*logit_normal"):
        RectifiedFlowObjective(timestep_sampling='normal')
    with pytest.raises(ConfigError, match=r'model\.objective\.loss_weighting'):
        RectifiedFlowObjective(loss_weighting='min_snr')
    with pytest.raises(ConfigError, match='flow_euler'):
        RectifiedFlowObjective().inference_scheduler('ddim')


@pytest.mark.parametrize('scheduler', ['flow_euler', 'flow_heun'])
def test_unet_flow_sampling_is_deterministic_per_seed(scheduler):
    model = build_tiny_sd(objective={'name': 'rectified_flow', 'shift': 3.0})
    pipe_scheduler = model.pipeline(scheduler).scheduler
    assert type(pipe_scheduler).__name__.startswith('FlowMatch') and pipe_scheduler.config.shift == 3.0
    kwargs = dict(num_inference_steps=3, guidance_scale=3.0, scheduler=scheduler)
    a = model.generate(['a red circle'], seed=7, **kwargs)
    b = model.generate(['a red circle'], seed=7, **kwargs)
    c = model.generate(['a red circle'], seed=8, **kwargs)
    assert a.shape == (1, 3, 16, 16)
    assert torch.equal(a, b)
    assert float((a - c).abs().max()) > 1e-3


def validation_mse(model, batch):
    model.eval()
    with torch.no_grad():
        prediction, target = model.eval_forward(batch)
    return float(torch.nn.functional.mse_loss(prediction, target))


@pytest.mark.slow
def test_unet_trains_with_the_flow_objective_from_the_yaml_switch(synthetic_dataset, tmp_path):
    cfg = tiny_config(
        synthetic_dataset,
        str(tmp_path),
        'model.objective=rectified_flow',
        'max_duration=30ba',
        'optimizer.lr=2e-3',
        'save_folder=null',
        'train_dataloader.batch_size=16',
    )
    trainer = build_trainer(cfg)
    model = trainer.state.model
    assert type(model.objective) is RectifiedFlowObjective
    batch = next(iter(trainer.state.train_dataloader))
    before = validation_mse(model, batch)
    recorder = LossRecorder()
    trainer.state.callbacks.append(recorder)
    trainer.fit()
    after = validation_mse(model, batch)
    assert len(recorder.losses) == 30
    # The fixed-timestep, fixed-noise validation loss is a noise-free measure of progress.
    assert after < 0.95 * before, (before, after, recorder.losses)
