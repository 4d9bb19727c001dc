"""The model's components: a denoiser, a text conditioner, an objective and adapters named from registries.

A package outside the repository adds a denoiser and an adapter through entry points (a few lines each, no edit
of library code) and trains through ``composer train.py``; adapters are applied before the optimizer, survive a
checkpoint round trip, and are merged for export.
"""

from __future__ import annotations

import importlib.metadata
import os
import textwrap

import catalogue
import pytest
import torch
from omegaconf import OmegaConf

from diffusion import registry
from diffusion.builders import build_model, build_optimizer
from diffusion.inference.export import export_model
from diffusion.models import Adapter, StableDiffusion, latent_diffusion
from diffusion.models.factories import TINY_UNET_CONFIG, merge_config
from tests.conftest import (
    TEST_TEXT_ENCODER,
    TEST_UNET,
    TEST_VAE,
    TINY_YAML,
    build_tiny_sd,
    run_composer,
)

UNET = merge_config(TINY_UNET_CONFIG, TEST_UNET)

# A third-party package: a convolutional denoiser and an output-gain adapter, registered by entry points.
PLUGIN = '''
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from diffusion.models import Adapter, Denoiser


class ConvNet(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, in_channels=4, width=8, text_dim=16, sample_size=8):
        super().__init__()
        self.inp = nn.Conv2d(in_channels, width, 3, padding=1)
        self.text = nn.Linear(text_dim, width)
        self.out = nn.Conv2d(width, in_channels, 3, padding=1)

    def forward(self, latents, timesteps, context):
        time = (timesteps.float() / 1000)[:, None, None, None]
        hidden = self.inp(latents) + self.text(context.mean(1))[..., None, None] + time
        return self.out(torch.nn.functional.silu(hidden))


class ConvDenoiser(Denoiser):
    attribute = 'network'
    network_class = ConvNet

    def __call__(self, noisy_latents, timesteps, conditioning):
        return self.network(noisy_latents, timesteps, conditioning['text_embeds'])

    def check_conditioning(self, shapes):
        if shapes['text_embeds'][-1] != self.config.text_dim:
            raise ValueError('text width != ConvNet text_dim')

    def fsdp_units(self):
        return []

    @staticmethod
    def activation_checkpointing_fn(module):
        return False


def conv_denoiser(width=8, text_dim=16):
    return ConvDenoiser(ConvNet(width=width, text_dim=text_dim))


class OutputGain(Adapter):
    """Freezes the denoiser and learns a per-channel gain on its output conv."""

    def __init__(self, init=1.0):
        self.init = init

    def apply(self, model):
        network = model.denoiser.network
        network.requires_grad_(False)
        layer = network.conv_out if hasattr(network, 'conv_out') else network.out
        layer.gain = nn.Parameter(torch.full((layer.out_channels,), float(self.init)))
        layer.register_forward_hook(lambda module, args, out: out * module.gain[None, :, None, None])

    def merge(self, model):
        network = model.denoiser.network
        layer = network.conv_out if hasattr(network, 'conv_out') else network.out
        with torch.no_grad():
            layer.weight.mul_(layer.gain[:, None, None, None])
            layer.bias.mul_(layer.gain)
        del layer.gain
        layer._forward_hooks.clear()
'''

ENTRY_POINTS = """
[diffusion_denoisers]
conv_denoiser = tiny_plugin:conv_denoiser

[diffusion_adapters]
output_gain = tiny_plugin:OutputGain
"""


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The plugin package installed on PYTHONPATH as a distribution with entry points (no pip, no network)."""
    folder = tmp_path / 'site'
    (folder / 'tiny_plugin-0.1.dist-info').mkdir(parents=True)
    (folder / 'tiny_plugin.py').write_text(textwrap.dedent(PLUGIN))
    (folder / 'tiny_plugin-0.1.dist-info' / 'METADATA').write_text(
        'Metadata-Version: 2.1\nName: tiny-plugin\nVersion: 0.1\n'
    )
    (folder / 'tiny_plugin-0.1.dist-info' / 'entry_points.txt').write_text(ENTRY_POINTS)
    monkeypatch.syspath_prepend(str(folder))
    # catalogue lists the installed entry points once, when imported; a package installed since is seen by new
    # processes (the composer run), and by this one after a fresh listing.
    monkeypatch.setattr(catalogue, 'AVAILABLE_ENTRY_POINTS', importlib.metadata.entry_points())
    monkeypatch.setenv('PYTHONPATH', os.pathsep.join(filter(None, [str(folder), os.environ.get('PYTHONPATH')])))
    return folder


def _composed(**denoiser) -> dict:
    return {
        'name': 'latent_diffusion',
        'denoiser': denoiser,
        'text_conditioner': {'name': 'clip', 'text_encoder_config': dict(TEST_TEXT_ENCODER, num_hidden_layers=1)},
        'vae_config': TEST_VAE,
    }


def _write_yaml(tmp_path, data: str, model: dict) -> str:
    cfg = OmegaConf.load(TINY_YAML)
    cfg.model = model
    cfg.train_dataloader.remote = data
    cfg.train_dataloader.resolution = 16
    cfg.run_folder = str(tmp_path / 'run')
    cfg.max_duration = '2ba'
    cfg.save_interval = '2ba'
    cfg.progress_bar = False
    path = tmp_path / 'plugin.yaml'
    OmegaConf.save(cfg, path)
    return str(path)


def test_latent_diffusion_composes_the_tiny_sd2_components_by_name():
    torch.manual_seed(0)
    preset = build_tiny_sd()
    torch.manual_seed(0)
    composed = latent_diffusion(
        denoiser={'name': 'unet', 'config': {**preset.unet.config}},
        text_conditioner={'name': 'clip', 'text_encoder_config': preset.text_encoder.config.to_dict()},
        vae_config={**preset.vae.config},
    )
    assert type(composed.denoiser).__name__ == 'UNetDenoiser'
    assert type(composed.conditioner).__name__ == 'CLIPTextConditioner'
    assert type(composed.objective).__name__ == 'DDPMObjective'
    for key, value in preset.state_dict().items():
        assert torch.equal(composed.state_dict()[key], value), key


def test_component_sections_name_the_bad_key():
    with pytest.raises(ValueError, match=r'Unknown denoisers name .transformer.\. Valid names: mmdit, unet'):
        latent_diffusion(denoiser={'name': 'transformer'}, text_conditioner={'name': 'clip'})
    with pytest.raises(ValueError, match=r'Unknown key model\.text_conditioner\.max_length'):
        latent_diffusion(denoiser={'name': 'unet', 'config': UNET}, text_conditioner={'name': 'clip', 'max_length': 3})
    with pytest.raises(ValueError, match=r'model\.objective replaces the DDPM keys \[.prediction_type.\]'):
        build_tiny_sd(objective={'name': 'ddpm'}, prediction_type='v_prediction')
    with pytest.raises(ValueError, match='cross_attention_dim'):
        build_tiny_sd(text_encoder_config={'hidden_size': 24})


def test_an_entry_point_denoiser_trains_through_composer(plugin, synthetic_dataset, tmp_path):
    yaml = _write_yaml(tmp_path, synthetic_dataset, _composed(name='conv_denoiser', width=8))
    run_composer(yaml)
    state = torch.load(tmp_path / 'run' / 'checkpoints' / 'ep0-ba2-rank0.pt', map_location='cpu', weights_only=False)
    weights = state['state']['model']
    assert 'network.inp.weight' in weights and not any(k.startswith('unet.') for k in weights)
    # The checkpoint's network moved away from its seeded initialisation: it trained.
    model = build_model(OmegaConf.load(yaml).model)
    assert not torch.equal(weights['network.inp.weight'], model.network.inp.weight)


def test_adapters_apply_before_the_optimizer_and_merge_for_export(plugin, tmp_path):
    model_cfg = OmegaConf.create({**_composed(name='unet', config=UNET), 'adapters': {'output_gain': {'init': 2.0}}})
    model = build_model(model_cfg)
    assert isinstance(model, StableDiffusion) and [a.name for a in model.adapters] == ['output_gain']
    optimizer = build_optimizer({'name': 'adamw', 'lr': 1e-3}, model)
    trained = {id(p) for group in optimizer.param_groups for p in group['params']}
    assert trained == {id(model.unet.conv_out.gain)}  # the adapter only: the base UNet is frozen
    model.eval()
    with torch.no_grad():
        adapted = model.generate(['a red circle'], num_inference_steps=2, seed=0)
    # Loading is strict: a rebuilt model takes the adapted state dict, gain included.
    rebuilt = build_model(model_cfg)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    # Export merges the gain into the conv weights of a copy; the model itself keeps its adapter.
    written = export_model(model, str(tmp_path / 'export'), model_card=False)
    assert hasattr(model.unet.conv_out, 'gain')
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(written['pipeline'], local_files_only=True)
    exported = pipe(
        ['a red circle'],
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type='pt',
        guidance_scale=7.5,
    ).images
    torch.testing.assert_close(exported, adapted, atol=1e-5, rtol=1e-4)


def test_an_adapter_that_cannot_merge_is_named_at_export(tmp_path):
    class Frozen(Adapter):
        def apply(self, model):
            model.vae.requires_grad_(False)

    model = build_tiny_sd()
    adapter = Frozen()
    adapter.name = 'frozen'
    model.adapters.append(adapter)
    with pytest.raises(ValueError, match="Adapter 'frozen' cannot be merged"):
        export_model(model, str(tmp_path / 'export'), model_card=False)


def test_component_registries_are_listed_with_the_others():
    assert registry.denoisers.names() == ['mmdit', 'unet']
    assert registry.text_conditioners.names() == ['clip', 'sd3', 'sdxl_clip', 't5']
    assert registry.objectives.names() == ['ddpm', 'rectified_flow']
    assert 'latent_diffusion' in registry.models


def test_component_and_adapter_keys_are_checked_before_anything_is_built():
    from diffusion.builders import check_sections
    from diffusion.config import load_config

    base = ['model.name=latent_diffusion', '~model.caption_drop_prob', '+model.text_conditioner={name:clip}']
    cfg = load_config(TINY_YAML, [*base, '+model.denoiser={name:unet,config:{},bogus:1}'])
    with pytest.raises(ValueError, match=r'Unknown key model\.denoiser\.bogus\. Valid keys: config'):
        check_sections(cfg)
    cfg = load_config(TINY_YAML, [*base, '+model.denoiser={name:unet}', '+model.adapters={dora:{rank:4}}'])
    with pytest.raises(ValueError, match=r'Unknown adapters name .dora.\. Valid names: lora'):
        check_sections(cfg)
