"""Composer's LowPrecisionGroupNorm and LowPrecisionLayerNorm, switched on from yaml, on our model.

Composer applies them only under AMP precision, which its Trainer refuses on CPU; the tests therefore run the
algorithms' ``Event.INIT`` through Composer's Engine on a ``State`` that says ``amp_bf16``, and check the CPU
Trainer's refusal separately.
"""

import pytest
import torch
from composer.algorithms.low_precision_groupnorm.low_precision_groupnorm import LPGroupNorm
from composer.algorithms.low_precision_layernorm.low_precision_layernorm import LPLayerNorm
from composer.algorithms.warnings import NoEffectWarning
from composer.core import Engine, Event, State
from composer.devices import DeviceCPU
from composer.loggers import Logger

from diffusion.builders import build_model, build_plugins, build_trainer
from tests.conftest import tiny_config

LOW_PRECISION_NORMS = ('+algorithms.low_precision_groupnorm={}', '+algorithms.low_precision_layernorm={}')


def count(module, cls):
    # Exact types: LPGroupNorm and LPLayerNorm subclass the torch norms they replace.
    return sum(type(child) is cls for child in module.modules())


def model_with_low_precision_norms(tmp_path):
    """The test model and the two algorithms from a yaml config, after the algorithms ran at Event.INIT."""
    cfg = tiny_config(str(tmp_path / 'unused'), str(tmp_path), *LOW_PRECISION_NORMS)
    model = build_model(cfg.model)
    algorithms = build_plugins('algorithms', cfg.algorithms)
    state = State(
        model, rank_zero_seed=0, run_name='lp', device=DeviceCPU(), precision='amp_bf16', algorithms=algorithms
    )
    counts = {
        (part, cls): count(getattr(model, part), cls)
        for part in ('unet', 'vae', 'text_encoder')
        for cls in (torch.nn.GroupNorm, torch.nn.LayerNorm)
    }
    Engine(state, Logger(state)).run_event(Event.INIT)
    return model, counts


def test_yaml_route_replaces_every_group_and_layer_norm(tmp_path):
    model, before = model_with_low_precision_norms(tmp_path)
    # The UNet has GroupNorms in its resnets and LayerNorms in its transformer blocks; the VAE has GroupNorms only;
    # the CLIP text encoder LayerNorms only.
    assert before[('unet', torch.nn.GroupNorm)] > 0 and before[('unet', torch.nn.LayerNorm)] > 0
    assert before[('vae', torch.nn.GroupNorm)] > 0 and before[('text_encoder', torch.nn.LayerNorm)] > 0
    for part in ('unet', 'vae', 'text_encoder'):
        module = getattr(model, part)
        assert count(module, LPGroupNorm) == before[(part, torch.nn.GroupNorm)], part
        assert count(module, LPLayerNorm) == before[(part, torch.nn.LayerNorm)], part
        assert count(module, torch.nn.GroupNorm) == count(module, torch.nn.LayerNorm) == 0, part


def test_unet_under_bf16_autocast_with_low_precision_norms_stays_close_to_fp32(tmp_path):
    model, _ = model_with_low_precision_norms(tmp_path)
    reference_model = build_model(tiny_config(str(tmp_path / 'unused'), str(tmp_path)).model)
    reference_model.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([10, 900])
    text_embeds = torch.randn(2, 77, 16, generator=generator)
    with torch.no_grad():
        reference = reference_model.unet(latents, timesteps, encoder_hidden_states=text_embeds).sample
        with torch.autocast('cpu', dtype=torch.bfloat16):
            output = model.unet(latents, timesteps, encoder_hidden_states=text_embeds).sample
            autocast_only = reference_model.unet(latents, timesteps, encoder_hidden_states=text_embeds).sample
    assert output.dtype == torch.bfloat16
    # Measured: max |bf16 - fp32| / std(fp32 output) = 0.033 to 0.055 over six model seeds (mean |diff| / std 0.009).
    relative_error = (output.float() - reference).abs().max() / reference.std()
    assert relative_error < 0.1, relative_error
    # On CPU the low-precision norms compute exactly what autocast alone computes: CPU autocast runs group_norm and
    # layer_norm in their input's dtype (bf16 here, from the preceding conv or linear), and Composer's LP norms test
    # torch.is_autocast_enabled(), which reports CUDA autocast only, so they add no cast of their own.
    assert torch.equal(output, autocast_only)


def test_cpu_trainer_refuses_amp_so_the_norms_stay_unchanged(synthetic_dataset, tmp_path):
    with pytest.raises(ValueError, match='AMP_BF16 is not supported for CPU training'):
        build_trainer(tiny_config(synthetic_dataset, str(tmp_path), 'precision=amp_bf16', *LOW_PRECISION_NORMS))
    with pytest.warns(NoEffectWarning, match='only applies to AMP_FP16 and AMP_BF16'):
        trainer = build_trainer(tiny_config(synthetic_dataset, str(tmp_path), 'save_folder=null', *LOW_PRECISION_NORMS))
    assert count(trainer.state.model, LPGroupNorm) == count(trainer.state.model, LPLayerNorm) == 0
    trainer.close()
