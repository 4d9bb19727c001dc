"""Bad LoRA input fails in one line naming the file or key, and nothing stays half loaded: a file for another base,
a kohya file with unknown keys or prefixes, a rank or target module that does not exist; a good file loads whole."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffusion.builders import build_model
from diffusion.inference.export import LORA_WEIGHTS, export_lora
from diffusion.inference.lora_files import LoraFileError, load_lora
from diffusion.models.lora import LoRA
from tests.conftest import build_adapted, build_tiny_sd, build_tiny_sdxl

PROMPTS = ['a red circle']


def base(build=build_tiny_sd, seed=0):
    torch.manual_seed(seed)
    return build().eval()


def has_lora_layers(model) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


@pytest.fixture(scope='module')
def sd2_lora(tmp_path_factory):
    folder = tmp_path_factory.mktemp('lora')
    model = build_adapted(build_tiny_sd, text_encoder=True)
    export_lora(model, str(folder), model_card=False)
    return model, folder


@pytest.mark.parametrize('weight_name', [LORA_WEIGHTS, 'lora_kohya.safetensors'])
def test_a_good_file_loads_whole_and_samples_the_adapted_models_images(sd2_lora, weight_name):
    model, folder = sd2_lora
    target = base()
    result = load_lora(target, str(folder), weight_name=weight_name)
    with safe_open(result['file'], 'pt') as f:
        assert result['weights'] == sum(1 for k in f.keys() if not k.endswith('.alpha'))
        assert f.metadata()['base_sha256']  # both files record their base
    sampling = dict(num_inference_steps=2, seed=0)
    torch.testing.assert_close(target.generate(PROMPTS, **sampling), model.generate(PROMPTS, **sampling), atol=1e-4,
                               rtol=0)  # fmt: skip


def test_a_file_for_another_base_is_refused_naming_the_file_and_both_bases(sd2_lora):
    _, folder = sd2_lora
    other = base(seed=1)  # the same architecture with other weights
    with pytest.raises(LoraFileError, match=rf'^{folder}/{LORA_WEIGHTS}: made for the base .*base_sha256 [0-9a-f]{{64}}'
                       r"\), but this model's base is sha256 [0-9a-f]{64}"):  # fmt: skip
        load_lora(other, str(folder))
    assert not has_lora_layers(other)


def test_a_file_for_another_architecture_is_refused_naming_the_key(tmp_path):
    # An SDXL adapter (32-wide cross-attention) onto an SD2 model (16-wide), without base metadata to catch it first.
    export_lora(build_adapted(build_tiny_sdxl), str(tmp_path), model_card=False)
    weights = load_file(tmp_path / LORA_WEIGHTS)
    save_file(weights, tmp_path / 'plain.safetensors')
    target = base()
    expected = (
        r'plain.safetensors: \S+\.lora_A\.weight \(of the UNet2DConditionModel\) is \[2, 32\] in the file but '
        r'\[2, 16\] in this model: the file is for another base model\.$'
    )
    with pytest.raises(LoraFileError, match=expected):
        load_lora(target, str(tmp_path / 'plain.safetensors'))
    assert not has_lora_layers(target)


def test_a_kohya_file_with_keys_that_match_no_layer_is_refused_and_nothing_stays_loaded(sd2_lora, tmp_path):
    _, folder = sd2_lora
    kohya = load_file(folder / 'lora_kohya.safetensors')
    with safe_open(folder / 'lora_kohya.safetensors', 'pt') as f:
        metadata = f.metadata()
    extra = {'lora_unet_no_such_block_to_q.lora_down.weight': torch.zeros(2, 16),
             'lora_unet_no_such_block_to_q.lora_up.weight': torch.zeros(16, 2),
             'lora_unet_no_such_block_to_q.alpha': torch.tensor(4.0)}  # fmt: skip
    save_file({**kohya, **extra}, tmp_path / 'extra.safetensors', metadata=metadata)
    target = base()
    with pytest.raises(LoraFileError, match=r'extra.safetensors: 2 of its \d+ LoRA weights name no layer of this '
                       r'StableDiffusionPipeline \(matching no layer: lora_unet_no_such_block_to_q.lora_down.weight, '
                       r'lora_unet_no_such_block_to_q.lora_up.weight\); nothing was loaded.$'):  # fmt: skip
        load_lora(target, str(tmp_path / 'extra.safetensors'))
    assert not has_lora_layers(target)  # no partial load: diffusers alone would have kept the rest, with a warning

    renamed = {k.replace('lora_unet_', 'lora_transformer_', 1): v for k, v in kohya.items()}
    save_file(renamed, tmp_path / 'prefix.safetensors', metadata=metadata)
    with pytest.raises(LoraFileError, match=r"prefix.safetensors: kohya key 'lora_transformer_\S+' \(\d+ such\) has an "
                       r'unknown prefix; accepted: lora_unet_, lora_te_, lora_te1_, lora_te2_'):  # fmt: skip
        load_lora(target, str(tmp_path / 'prefix.safetensors'))
    assert not has_lora_layers(target)


def test_a_rank_or_target_module_that_does_not_exist_is_refused_before_the_model_changes():
    for rank in (0, 2.5, True):
        with pytest.raises(ValueError, match=rf'model.adapters.lora.rank must be a positive integer; got {rank!r}'):
            LoRA(rank=rank)
    model = build_tiny_sd()
    with pytest.raises(ValueError, match=r"^model.adapters.lora.target_modules: 'to_qq' names no Linear or Conv2d "
                       r'layer of unet; accepted: .*to_k, to_out.0, to_q, to_v'):  # fmt: skip
        LoRA(target_modules=['to_q', 'to_qq']).apply(model)
    expected = (
        r"^model.adapters.lora.text_encoder_target_modules: 'query' names no Linear or Conv2d layer of "
        r'text_encoder; accepted: fc1, fc2, k_proj, out_proj, q_proj, v_proj'
    )
    with pytest.raises(ValueError, match=expected):
        LoRA(text_encoder=True, text_encoder_target_modules=['query']).apply(model)
    assert not has_lora_layers(model) and all(p.requires_grad for p in model.unet.parameters())
    # From a config, the same line.
    with pytest.raises(ValueError, match=r"model.adapters.lora.target_modules: 'attn9' names no Linear"):
        build_model({'name': 'tiny_stable_diffusion', 'adapters': {'lora': {'rank': 2, 'target_modules': ['attn9']}}})


def test_the_sampling_cli_draws_with_a_lora_file_and_refuses_one_for_another_base(sd2_lora, tmp_path):
    from diffusion.inference.export import export_model
    from diffusion.inference.sample import main as sample_cli
    from tests.inference.test_sample import as_uint8, pixels

    model, folder = sd2_lora
    export_model(base(), str(tmp_path / 'base'), model_card=False)
    prompts = tmp_path / 'prompts.txt'
    prompts.write_text('a red circle\n')
    common = ['--prompts', str(prompts), '--seeds', '4', '--steps', '2', '--scheduler', 'ddim', '--no-contact-sheet']
    rows = sample_cli(['--checkpoint', str(tmp_path / 'base'), '--lora', str(folder), '--out', str(tmp_path / 'out'),
                       *common])  # fmt: skip
    assert rows[0]['lora'] == str(folder / LORA_WEIGHTS)  # recorded, so another adapter is drawn anew
    expected = model.generate(['a red circle'], seed=[4], num_inference_steps=2, scheduler='ddim')[0]
    drawn = pixels(tmp_path / 'out' / rows[0]['file'])
    assert np.abs(drawn - as_uint8(expected)).max() <= 1

    torch.manual_seed(1)
    export_model(build_tiny_sd(), str(tmp_path / 'other'), model_card=False)
    with pytest.raises(SystemExit, match=rf'^error: --lora {folder}/{LORA_WEIGHTS}: made for the base '):
        sample_cli(['--checkpoint', str(tmp_path / 'other'), '--lora', str(folder), '--out', str(tmp_path / 'o2'),
                    *common])  # fmt: skip
    assert not (tmp_path / 'o2' / rows[0]['file']).exists()


def test_a_diffusers_file_with_a_key_that_matches_no_layer_is_refused_naming_it(sd2_lora, tmp_path):
    _, folder = sd2_lora
    weights = load_file(folder / LORA_WEIGHTS)
    with safe_open(folder / LORA_WEIGHTS, 'pt') as f:
        metadata = f.metadata()
    extra = {'unet.no_such_block.to_q.lora.down.weight': torch.zeros(2, 16),
             'unet.no_such_block.to_q.lora.up.weight': torch.zeros(16, 2)}  # fmt: skip
    save_file({**weights, **extra}, tmp_path / 'extra.safetensors', metadata=metadata)
    target = base()
    with pytest.raises(LoraFileError, match=r'extra.safetensors: 2 of its \d+ LoRA weights name no layer of this '
                       r'StableDiffusionPipeline \(matching no layer: unet.no_such_block.to_q.lora.down.weight, '
                       r'unet.no_such_block.to_q.lora.up.weight\); nothing was loaded.$'):  # fmt: skip
        load_lora(target, str(tmp_path / 'extra.safetensors'))
    assert not has_lora_layers(target)
