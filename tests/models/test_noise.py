import numpy as np
import pytest
import torch

from diffusion.models.noise import (
    build_inference_scheduler,
    build_noise_scheduler,
    min_snr_weights,
    signal_to_noise_ratio,
    training_target,
)


def reference_alpha_bar(num_steps=1000, beta_start=0.00085, beta_end=0.012):
    """SD's scaled-linear schedule, computed independently of diffusers."""
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


@pytest.mark.parametrize('prediction_type', ['epsilon', 'v_prediction', 'sample'])
def test_training_target_matches_independent_formula(prediction_type):
    scheduler = build_noise_scheduler(prediction_type=prediction_type)
    latents, noise = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    timesteps = torch.tensor([0, 1, 250, 500, 998, 999])
    target = training_target(scheduler, latents, noise, timesteps)

    alpha_bar = torch.tensor(reference_alpha_bar()[timesteps.numpy()], dtype=torch.float32)[:, None, None, None]
    expected = {
        'epsilon': noise,
        'v_prediction': alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents,
        'sample': latents,
    }[prediction_type]
    torch.testing.assert_close(target, expected, atol=1e-5, rtol=1e-4)
    # add_noise is the forward process x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps.
    noisy = scheduler.add_noise(latents, noise, timesteps)
    torch.testing.assert_close(noisy, alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise, atol=1e-5, rtol=1e-4)


def test_zero_terminal_snr_makes_last_alpha_bar_zero():
    plain = build_noise_scheduler(prediction_type='v_prediction')
    rescaled = build_noise_scheduler(prediction_type='v_prediction', zero_terminal_snr=True)
    assert float(plain.alphas_cumprod[-1]) > 1e-3
    assert float(rescaled.alphas_cumprod[-1]) == 0.0
    assert float(signal_to_noise_ratio(rescaled, torch.tensor([999]))) == 0.0
    # The first step is (almost) unchanged: rescaling keeps alpha-bar_0.
    assert abs(float(rescaled.alphas_cumprod[0]) - float(plain.alphas_cumprod[0])) < 1e-6
    assert rescaled.config.timestep_spacing == 'trailing'


def test_zero_terminal_snr_rejects_epsilon():
    with pytest.raises(ValueError, match='zero_terminal_snr'):
        build_noise_scheduler(prediction_type='epsilon', zero_terminal_snr=True)


def test_unknown_prediction_type_and_scheduler_names_raise():
    with pytest.raises(ValueError, match="'x0'.*epsilon, v_prediction, sample"):
        build_noise_scheduler(prediction_type='x0')
    with pytest.raises(ValueError, match="'plms'.*ddim"):
        build_inference_scheduler('plms', build_noise_scheduler())


def test_snr_matches_formula():
    scheduler = build_noise_scheduler()
    t = torch.tensor([0, 10, 500, 999])
    ab = reference_alpha_bar()[t.numpy()]
    np.testing.assert_allclose(signal_to_noise_ratio(scheduler, t).numpy(), ab / (1 - ab), rtol=1e-4)


@pytest.mark.parametrize('prediction_type', ['epsilon', 'v_prediction', 'sample'])
def test_min_snr_weights_match_formula(prediction_type):
    snr = torch.tensor([0.01, 0.5, 4.9, 5.0, 20.0, 1000.0])
    gamma = 5.0
    w = min_snr_weights(snr, gamma, prediction_type)
    s = snr.numpy().astype(np.float64)
    expected = {
        'epsilon': np.minimum(s, gamma) / s,
        'v_prediction': np.minimum(s, gamma) / (s + 1),
        'sample': np.minimum(s, gamma),
    }[prediction_type]
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-6)


def test_min_snr_epsilon_weight_is_finite_at_zero_snr():
    w = min_snr_weights(torch.tensor([0.0, 1.0]), 5.0, 'epsilon')
    assert torch.isfinite(w).all() and float(w[0]) == 1.0


@pytest.mark.parametrize('name', ['ddim', 'euler', 'dpm++', 'euler_ancestral', 'ddpm'])
def test_inference_scheduler_shares_training_config(name):
    train = build_noise_scheduler(prediction_type='v_prediction', zero_terminal_snr=True)
    sampler = build_inference_scheduler(name, train)
    assert sampler.config.prediction_type == 'v_prediction'
    assert sampler.config.beta_schedule == 'scaled_linear'
    assert sampler.config.num_train_timesteps == 1000
