"""Scheduled EMA (Composer's EMA with ema_start): sampling and export use the average, and it survives a resume."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from diffusion.builders import build_trainer
from diffusion.callbacks.ema_weights import ema_weights, find_ema
from tests.conftest import EMA_TEST_OVERRIDES, tiny_config


def ema_run(data: str, folder: str, *overrides: str):
    cfg = tiny_config(data, folder, *EMA_TEST_OVERRIDES, *overrides)
    return build_trainer(cfg)


def unet_weights(model) -> dict[str, torch.Tensor]:
    return {f'unet.{k}': v.detach().clone() for k, v in model.unet.state_dict().items()}


def test_export_and_sampling_use_the_ema_weights_once_ema_started(synthetic_dataset, tmp_path):
    trainer = ema_run(
        synthetic_dataset, str(tmp_path), 'max_duration=4ba', 'save_folder=null',
        f'+callbacks.save_pretrained={{folder: {tmp_path}/export, components: [unet]}}',
    )  # fmt: skip
    trainer.fit()
    ema = find_ema(trainer.state)
    assert ema.ema_started and not ema.ema_weights_active
    averaged = {k: v for k, v in ema.ema_model.named_parameters_dict.items() if k.startswith('unet.')}
    trained = unet_weights(trainer.state.model)
    assert any(not torch.equal(averaged[k], trained[k]) for k in averaged)

    exported = UNet2DConditionModel.from_pretrained(str(tmp_path / 'export' / 'unet'))
    for name, value in exported.state_dict().items():
        assert torch.equal(value, averaged[f'unet.{name}']), name
    # Frozen encoders are not averaged (Composer's EMA copies trainable parameters only).
    assert not any(k.startswith(('vae.', 'text_encoder.')) for k in ema.ema_model.named_parameters_dict)

    with ema_weights(trainer.state) as on_ema:
        assert on_ema
        inside = unet_weights(trainer.state.model)
    assert all(torch.equal(inside[k], averaged[k]) for k in averaged)
    after = unet_weights(trainer.state.model)
    assert all(torch.equal(after[k], trained[k]) for k in trained)  # swapped back


def test_before_ema_start_the_training_weights_are_used(synthetic_dataset, tmp_path):
    trainer = ema_run(synthetic_dataset, str(tmp_path), 'max_duration=1ba', 'save_folder=null')
    trainer.fit()
    before = unet_weights(trainer.state.model)
    with ema_weights(trainer.state) as on_ema:
        assert not on_ema
        assert all(torch.equal(v, before[k]) for k, v in unet_weights(trainer.state.model).items())


@pytest.mark.slow
def test_ema_state_survives_a_resume_bit_exactly(synthetic_dataset, tmp_path):
    common = ('save_interval=3ba',)
    full = ema_run(synthetic_dataset, str(tmp_path / 'full'), 'max_duration=6ba', *common)
    full.fit()
    part = ema_run(synthetic_dataset, str(tmp_path / 'part'), 'max_duration=3ba', *common)
    part.fit()
    checkpoint = tmp_path / 'part' / 'checkpoints' / 'ep0-ba3-rank0.pt'
    resumed = ema_run(synthetic_dataset, str(tmp_path / 'resumed'), 'max_duration=6ba', f'load_path={checkpoint}',
                      'load_trusted=true', *common)  # fmt: skip
    resumed.fit()
    full_ema, resumed_ema = find_ema(full.state), find_ema(resumed.state)
    assert resumed_ema.ema_started
    for name, value in full_ema.ema_model.named_parameters_dict.items():
        assert torch.equal(resumed_ema.ema_model.named_parameters_dict[name], value), name
    # The checkpoint held the EMA weights in the model; the resumed run trained on the raw ones and ends identical.
    full_weights, resumed_weights = unet_weights(full.state.model), unet_weights(resumed.state.model)
    assert all(torch.equal(resumed_weights[k], v) for k, v in full_weights.items())
